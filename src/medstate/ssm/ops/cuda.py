"""Optional fused CUDA kernels (mamba-ssm, causal-conv1d). Thin and guarded: each wrapper returns None when
the tensors are not on CUDA, the packages are missing, or the call needs a feature the kernel lacks; the
caller then takes the PyTorch path. Results are compared with the PyTorch path in tests/ssm/test_cuda.py."""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from medstate.ssm.ops.conv import carried_window


@functools.cache
def kernels() -> SimpleNamespace | None:
    """The fused kernels, or None when mamba_ssm / causal_conv1d are not importable."""
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except ImportError:
        return None
    return SimpleNamespace(
        causal_conv1d_fn=causal_conv1d_fn,
        selective_scan_fn=selective_scan_fn,
        mamba_chunk_scan_combined=mamba_chunk_scan_combined,
    )


def usable(x: torch.Tensor) -> SimpleNamespace | None:
    return kernels() if x.is_cuda else None


def causal_conv1d(x, weight, bias, window, seq_idx):
    """Fused conv + SiLU for a fresh sequence (no carried window); x [B, T, C].
    Returns (y [B, T, C], new window [B, C, K-1]) or None."""
    fused = usable(x)
    if fused is None or window is not None:
        return None
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    x = x.transpose(1, 2)
    # the kernel's seq_idx path wants channel-last memory, i.e. a [B, C, T] view of a [B, T, C] tensor
    y = fused.causal_conv1d_fn(x, weight, bias, seq_idx=seq, activation="silu").transpose(1, 2)
    return y, carried_window(x.transpose(1, 2), None, seq_idx, weight.shape[1])


def selective_scan(x, dt, A, B, C, initial_state, reset):
    """Mamba-1 scan (y without D and gate, final state) or None. The fused kernel has no initial state and no
    packed-sequence reset, so those calls stay on the PyTorch path."""
    fused = usable(x)
    if fused is None or initial_state is not None or reset is not None:
        return None
    y, last = fused.selective_scan_fn(
        x.transpose(1, 2).contiguous(),
        dt.transpose(1, 2).contiguous(),
        A,
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        return_last_state=True,
    )
    return y.transpose(1, 2).float(), last.float()


def ssd_scan(x, dt, A, B, C, chunk_size, initial_state, seq_idx):
    """Mamba-2 chunked scan (y without D, final state) or None."""
    fused = usable(x)
    if fused is None:
        return None
    seq = seq_idx.to(torch.int32).contiguous() if seq_idx is not None else None
    y, last = fused.mamba_chunk_scan_combined(
        x,
        dt,
        A,
        B,
        C,
        chunk_size,
        initial_states=initial_state,
        seq_idx=seq,
        dt_limit=(0.0, math.inf),
        return_final_states=True,
    )
    return y.float(), last.float()
