"""Causal depthwise convolution over time (channel-last), with a carried input window and packed-sequence
boundaries:

    y[b, t, c] = act( bias[c] + sum_k weight[c, k] * x[b, t - (K - 1) + k, c] )

Positions before t = 0 read the carried window (the K-1 inputs that preceded this call, oldest first); with
`seq_idx`, a tap that reaches into another packed sequence reads zero. Channel-last avoids the transposes
(and the slow strided backward kernels they cause) around the projections that feed and consume it; the
backward is written by hand so that no per-tap zero-filled gradient buffers are allocated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def same_sequence_masks(seq_idx: torch.Tensor, width: int) -> torch.Tensor:
    """[width, B, T] bool: mask[k, b, t] is True when position t - (width - 1) + k is in t's sequence.
    Positions before the start of the row belong to the row's first sequence (the carried window)."""
    padded = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)
    steps = seq_idx.shape[1]
    return torch.stack([padded[:, k : k + steps] == seq_idx for k in range(width)])


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, padded, weight, bias, masks, activation):
        width = weight.shape[1]
        steps = padded.shape[1] - width + 1
        pre = padded[:, 0:steps] * weight[:, 0]
        if masks is not None:
            pre.mul_(masks[0])
        for k in range(1, width):
            term = padded[:, k : k + steps] * weight[:, k]
            pre.add_(term.mul_(masks[k]) if masks is not None else term)
        if bias is not None:
            pre.add_(bias)
        ctx.save_for_backward(padded, weight, masks, pre)
        ctx.has_bias, ctx.activation = bias is not None, activation
        return F.silu(pre) if activation else pre

    @staticmethod
    def backward(ctx, grad_out):
        padded, weight, masks, pre = ctx.saved_tensors
        width = weight.shape[1]
        steps = pre.shape[1]
        grad_pre = torch.ops.aten.silu_backward(grad_out.contiguous(), pre) if ctx.activation else grad_out
        grad_padded = torch.zeros_like(padded)
        grad_weight = torch.empty_like(weight)
        for k in range(width):
            g = grad_pre * masks[k] if masks is not None else grad_pre
            grad_padded[:, k : k + steps].addcmul_(g, weight[:, k])
            grad_weight[:, k] = (g * padded[:, k : k + steps]).sum((0, 1))
        grad_bias = grad_pre.sum((0, 1)) if ctx.has_bias else None
        return grad_padded, grad_weight, grad_bias, None, None


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    window: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
    activation: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, T, C], weight [C, K], window [B, C, K-1] or None (zeros), seq_idx [B, T] non-decreasing.

    Returns (y [B, T, C], with SiLU when `activation`; new window [B, C, K-1]). The new window holds the last
    K-1 inputs of each row's last sequence (inputs of earlier sequences are zeroed), so continuing from it
    never leaks across a packed boundary."""
    width = weight.shape[1]
    batch, _, channels = x.shape
    if window is None:
        window = x.new_zeros(batch, channels, width - 1)
    padded = torch.cat([window.to(x.dtype).transpose(1, 2), x], dim=1)
    masks = None
    if seq_idx is not None:
        masks = same_sequence_masks(seq_idx, width).unsqueeze(-1).to(x.dtype)  # [K, B, T, 1]
    y = _CausalConv.apply(padded, weight, bias, masks, activation)
    return y, carried_window(x, window, seq_idx, width)


def carried_window(
    x: torch.Tensor, window: torch.Tensor | None, seq_idx: torch.Tensor | None, width: int
) -> torch.Tensor:
    """The K-1 inputs [B, C, K-1] to carry into the next call: the old window (zeros if None) followed by
    x [B, T, C], cut to the last K-1 positions, with positions outside each row's last sequence zeroed."""
    batch, steps, channels = x.shape
    history = window.to(x.dtype) if window is not None else x.new_zeros(batch, channels, width - 1)
    recent = x[:, max(0, steps - (width - 1)) :].transpose(1, 2)
    full = torch.cat([history, recent], dim=2)
    tail = full[:, :, full.shape[2] - (width - 1) :]
    if seq_idx is None or width == 1:
        return tail
    seq = torch.cat([seq_idx[:, :1].expand(-1, width - 1), seq_idx], dim=1)
    tail_seq = seq[:, seq.shape[1] - (width - 1) :]
    return tail * (tail_seq == seq_idx[:, -1:]).unsqueeze(1).to(x.dtype)


def causal_conv1d_ref(x, weight, bias=None, window=None, seq_idx=None, activation=True):
    """Reference twin: each output as an explicit sum over its taps (slow)."""
    batch, steps, channels = x.shape
    width = weight.shape[1]
    history = window.transpose(1, 2) if window is not None else x.new_zeros(batch, width - 1, channels)
    full = torch.cat([history, x], dim=1)
    outputs = []
    for t in range(steps):
        acc = bias.expand(batch, channels).clone() if bias is not None else x.new_zeros(batch, channels)
        for k in range(width):
            source = t - (width - 1) + k
            term = full[:, source + width - 1] * weight[:, k]
            if seq_idx is not None:
                same = seq_idx[:, max(source, 0)] == seq_idx[:, t]
                term = term * same.to(x.dtype)[:, None]
            acc = acc + term
        outputs.append(F.silu(acc) if activation else acc)
    return torch.stack(outputs, dim=1)


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
