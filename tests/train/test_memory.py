"""retained_memory: inside it, large tensors allocated and freed step after step stop costing page faults (the
memory stays in the process); with glibc's defaults each one is unmapped when freed and faulted in again. Measured
with the minor page-fault count of a fresh process (glibc's state depends on what a process did before)."""

import json
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc settings only"
)
PAGES = 64 * 2**20 // 4096  # a 64 MB tensor: above glibc's largest mmap threshold (32 MB)
ROUNDS = f"""
import json, resource, sys, torch
from medstate.train.memory import retained_memory

counts = []
with retained_memory(sys.argv[1] == "kept") as active:
    for _ in range(4):  # rounds of 5 allocations (touched, then freed) of a 64 MB tensor
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(5):
            torch.ones({PAGES} * 1024)
        counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"active": active, "faults": counts}}))
"""


def rounds(mode: str) -> dict:
    result = subprocess.run([sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def test_freed_memory_is_reused_inside_and_unmapped_by_default():
    kept, default = rounds("kept"), rounds("default")
    assert kept["active"] and not default["active"]
    assert kept["faults"][-1] < PAGES // 10  # steady state: no page is faulted in again
    assert min(default["faults"]) > 4 * PAGES  # each of the 5 allocations faults its pages in
