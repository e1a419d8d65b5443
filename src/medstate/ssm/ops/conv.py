"""Causal depthwise convolution over time, with a carried input window and packed-sequence boundaries.

y[b, c, t] = bias[c] + sum_k weight[c, k] * x[b, c, t - (K - 1) + k]

where positions before t = 0 read the carried window (the K-1 inputs that preceded this call, oldest
first) and, with `seq_idx`, a tap that reaches into another packed sequence reads zero.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_sequence_masks(seq_idx: torch.Tensor, width: int) -> torch.Tensor:
    """[width, B, T] bool: mask[k, b, t] is True when position t - (width - 1) + k is in t's sequence.

    Positions before the start of the row belong to the row's first sequence (they come from the carried
    window, i.e. the same sequence continued)."""
    padded = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)
    steps = seq_idx.shape[1]
    return torch.stack([padded[:, k : k + steps] == seq_idx for k in range(width)])


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, T], weight [C, K], window [B, C, K-1] or None (zeros), seq_idx [B, T] non-decreasing.

    Returns (y [B, C, T] with SiLU applied when `activation`, new window [B, C, K-1]). The new window holds
    the last K-1 inputs of the last sequence of each row (earlier sequences' inputs are zeroed), so that
    continuing from it never leaks across a packed boundary."""
    width = weight.shape[1]
    batch, channels, steps = x.shape
    if window is None:
        window = x.new_zeros(batch, channels, width - 1)
    padded = torch.cat([window.to(x.dtype), x], dim=2)
    if seq_idx is None:
        y = F.conv1d(padded, weight.unsqueeze(1), bias, groups=channels)
    else:
        masks = same_sequence_masks(seq_idx, width).unsqueeze(2)  # [K, B, 1, T]
        y = padded[:, :, 0:steps] * weight[:, 0, None] * masks[0]
        for k in range(1, width):
            y = y + padded[:, :, k : k + steps] * weight[:, k, None] * masks[k]
        if bias is not None:
            y = y + bias[:, None]
    new_window = padded[:, :, steps:]
    if seq_idx is not None and width > 1:
        last = seq_idx[:, -1:]
        tail_seq = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)[:, -(width - 1) :]
        new_window = new_window * (tail_seq == last).unsqueeze(1).to(x.dtype)
    if activation:
        y = F.silu(y)
    return y, new_window


def causal_conv1d_step(
    x: torch.Tensor, window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, activation: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """One time step: x [B, C], window [B, C, K-1] → (y [B, C], new window)."""
    full = torch.cat([window.to(x.dtype), x.unsqueeze(-1)], dim=-1)
    y = (full * weight).sum(-1)
    if bias is not None:
        y = y + bias
    if activation:
        y = F.silu(y)
    return y, full[:, :, 1:]
