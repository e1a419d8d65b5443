"""Keep freed memory in the process while training on the CPU (glibc malloc).

glibc serves every allocation above 32 MB (the most its adaptive threshold reaches) with a fresh mmap and unmaps it
when freed, so each such tensor (a 16,384 × 1,168 activation, a 256-row chunk of 50k-id logits, a 50k × 768
gradient) is page-faulted in again, 4 KiB at a time, at every step. Measured here on 2 cores: a 16,384-token training
step of a width-256 Mamba-2 takes 17 s instead of 26 s with the memory kept, for 25% more peak RSS; a
mamba2-130m-shaped step at 1,024 tokens 9.3 s instead of 11.8 s. Inside `retained_memory`, malloc takes all memory
from its heap (M_MMAP_MAX 0) and keeps what is freed (M_TRIM_THRESHOLD at its maximum), so after a step or two the
next step reuses it, as torch's caching allocator does on CUDA. On leaving, glibc's defaults are put back and the
heap is trimmed. Elsewhere than glibc (macOS, musl) it does nothing.

The price is memory: the heap keeps the holes between differently sized tensors. A mamba2-130m-shaped step at
16,384 tokens (benchmarks/notes.py): 177 s at 10.6 GB peak RSS with memory kept, 367 s at 6.6 GB without
(`TrainConfig.retain_memory = False`), which is what to choose when memory is the bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import platform
from collections.abc import Iterable, Iterator

import torch

M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
DEFAULT_TRIM_THRESHOLD, DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _glibc():
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


@contextlib.contextmanager
def retained_memory(enabled: bool = True) -> Iterator[bool]:
    """Yields whether freed memory is kept. Either way, threads that allocate inside share the main heap (one
    malloc arena: measured 1.2-1.3x faster training steps on 2 cores, with and without keeping memory)."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    libc.mallopt(M_ARENA_MAX, 1)
    if enabled:
        libc.mallopt(M_MMAP_MAX, 0)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield enabled
    finally:
        libc.mallopt(M_ARENA_MAX, 0)  # glibc's default: arenas as threads need them
        if enabled:
            libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX)
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_THRESHOLD)
            libc.malloc_trim(0)


class KeptGradients:
    """Gradient buffers allocated once, before the first backward pass, and zeroed rather than freed between steps.

    With freed memory kept (`retained_memory`), buffers allocated during the backward pass sit between the
    activations freed around them and split the heap into holes that later, larger tensors cannot reuse: a
    mamba2-130m-shaped step at 16,384 tokens held 7.9 GB (8 blocks) with gradients allocated in the backward pass
    and 6.3 GB with them allocated first. A parameter that gets no gradient in a step (unused by the loss) has its
    `grad` set back to None before the optimizer runs, as `zero_grad(set_to_none=True)` would leave it, so the
    optimizer skips it exactly as before; its buffer is kept aside for the next step.
    """

    def __init__(self, parameters: Iterable[torch.nn.Parameter]):
        self.parameters = [p for p in parameters if p.requires_grad]
        self._touched: set[int] = set()
        self._aside: dict[int, torch.Tensor] = {}
        self._hooks = [
            p.register_post_accumulate_grad_hook(lambda _, i=i: self._touched.add(i))
            for i, p in enumerate(self.parameters)
        ]

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()

    def zero(self) -> None:
        """Before a step: every parameter gets its zeroed buffer as `grad` (no other reference is held, so the
        backward pass accumulates into it in place)."""
        for i, parameter in enumerate(self.parameters):
            if parameter.grad is None:
                parameter.grad = self._aside.pop(i, None)
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            else:
                parameter.grad.zero_()
        self._touched.clear()

    def release_untouched(self) -> None:
        """After the backward passes: parameters that received no gradient get `grad = None` again."""
        for i, parameter in enumerate(self.parameters):
            if i not in self._touched and parameter.grad is not None:
                self._aside[i] = parameter.grad
                parameter.grad = None
