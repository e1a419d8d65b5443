"""bf16 autocast where it is faster: CPUs differ (AMX runs bf16 matrix products ~7x faster than fp32, AVX512-BF16
~2x, and a CPU with neither ~100x slower), so the choice is measured on the spot, never assumed."""

from __future__ import annotations

import statistics
import time

import torch

from medstate.errors import MedstateError


def matmul_seconds(dtype: torch.dtype, device: torch.device, size: int = 512, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    times = []
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """True / False as asked; "auto": bf16 when its matrix products run at least 1.2x faster than fp32 here."""
    if isinstance(setting, bool):
        return setting
    if setting != "auto":
        raise MedstateError(f"bf16 must be true, false or auto, got {setting!r}")
    return matmul_seconds(torch.float32, device) >= 1.2 * matmul_seconds(torch.bfloat16, device)
