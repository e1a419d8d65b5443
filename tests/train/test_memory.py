"""retained_memory: inside it, large tensors allocated and freed step after step stop costing page faults (the
memory stays in the process); outside, glibc unmaps each one and every allocation faults its pages in again.
Measured with the process's minor page-fault count."""

import platform
import resource

import pytest
import torch

from medstate.train.memory import retained_memory

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings only"
)
PAGES = 64 * 2**20 // 4096  # a 64 MB tensor: above glibc's largest mmap threshold (32 MB)


def faults_per_round() -> list[int]:
    """Page faults of each of 4 rounds of 5 allocations (touched, then freed) of a 64 MB tensor."""
    counts = []
    for _ in range(4):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones(PAGES * 1024)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return counts


def test_freed_memory_is_reused_inside_and_unmapped_outside():
    with retained_memory() as active:
        assert active
        inside = faults_per_round()
    outside = faults_per_round()
    assert inside[-1] < PAGES // 10  # steady state: no page is faulted in again
    assert min(outside) > 4 * PAGES  # each of the 5 allocations faults its pages in
    with retained_memory(enabled=False) as active:
        assert not active
