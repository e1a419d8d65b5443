"""Layers: RMS norms, the Mamba-1 and Mamba-2 mixers and the pre-norm residual block.

Parameter names and shapes match transformers' MambaForCausalLM / Mamba2ForCausalLM (and mamba_ssm), so their
state dicts load without renaming. Every mixer has `forward` (a whole sequence, optionally continuing from a
layer state and with packed-sequence `seq_idx`) and `step` (one token)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from medstate.ssm.config import SSMConfig
from medstate.ssm.ops import cuda
from medstate.ssm.ops.conv import causal_conv1d, causal_conv1d_step
from medstate.ssm.ops.norm_linear import rms_norm_linear
from medstate.ssm.ops.selective_scan import selective_scan, selective_scan_step
from medstate.ssm.ops.ssd import ssd_scan, ssd_step

LayerState = tuple[torch.Tensor, torch.Tensor]  # (conv window, ssm state)

# The chunk length only changes how the SSD sum is grouped, not its value. On the CPU, 64 balances the
# [Q, Q] intra-chunk work against the per-chunk states.
CPU_SSD_CHUNK = 64


@functools.cache
def last_level_cache_bytes() -> int:
    """Size of the CPU's largest cache (Linux sysfs), 32 MiB where it cannot be read."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = entry.read_text().strip()
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 << 20)


def cpu_piece_rows(rows: int, steps: int, width: int) -> int:
    """Rows per piece so that one [piece, steps, width] float32 tensor takes at most a quarter of the last-level cache.

    Every op of a mixer streams whole [rows, steps, width] tensors; with many short sequences (image patches,
    one row per scan route) they leave the cache between ops and the CPU waits on memory. Mixing the rows in
    pieces keeps each piece's intermediates cached (benchmarks/vision.py times the tiny image classifier, 256
    rows x 196 tokens at width 96, both ways). Rows are independent, so nothing changes but the grouping."""
    per_row = max(1, steps * width * 4)
    limit = max(1, last_level_cache_bytes() // 4 // per_row)
    pieces = -(-rows // limit)
    return -(-rows // pieces)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm(x * silu(z)) normalised per group of `group_size` channels (mamba_ssm norm_before_gate=False)."""

    def __init__(self, size: int, group_size: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.group_size = group_size
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float() * F.silu(gate.float())
        grouped = x.unflatten(-1, (-1, self.group_size))
        grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * grouped.flatten(-2).to(dtype)


def sequence_starts(seq_idx: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: True at the first token of every packed sequence after the first one in its row."""
    starts = torch.zeros_like(seq_idx, dtype=torch.bool)
    starts[:, 1:] = seq_idx[:, 1:] != seq_idx[:, :-1]
    return starts


class _Mixer(nn.Module):
    """[norm →] in_proj → mix (conv, scan, skip, gating) → out_proj. With `recompute` set, training keeps only the
    in_proj output for backward and recomputes the mix there (the GEMMs are not recomputed). Given the block's
    `norm`, norm and in_proj run as one op that keeps only the norm's input for backward (float32/64)."""

    recompute = False

    def forward(
        self,
        hidden: torch.Tensor,
        state: LayerState | None = None,
        seq_idx: torch.Tensor | None = None,
        norm: RMSNorm | None = None,
    ) -> tuple[torch.Tensor, LayerState]:
        rows, steps = hidden.shape[:2]
        piece = rows if hidden.is_cuda else cpu_piece_rows(rows, steps, self.in_proj.out_features)
        if piece >= rows:
            return self._forward(hidden, state, seq_idx, norm)
        outputs, windows, states = [], [], []
        for start in range(0, rows, piece):
            part = slice(start, start + piece)
            out, (window, ssm_state) = self._forward(
                hidden[part],
                None if state is None else (state[0][part], state[1][part]),
                None if seq_idx is None else seq_idx[part],
                norm,
            )
            outputs.append(out)
            windows.append(window)
            states.append(ssm_state)
        return torch.cat(outputs), (torch.cat(windows), torch.cat(states))

    def _forward(self, hidden, state, seq_idx, norm) -> tuple[torch.Tensor, LayerState]:
        if norm is None:
            projected = self.in_proj(hidden)
        elif hidden.dtype in (torch.float32, torch.float64) and type(self.in_proj) is nn.Linear:
            # (an adapted in_proj, a LoRA layer, is called as a module: its weight alone is not what it computes)
            projected = rms_norm_linear(hidden, norm.weight, norm.eps, self.in_proj.weight, self.in_proj.bias)
        else:
            projected = self.in_proj(norm(hidden))
        if self.recompute and torch.is_grad_enabled() and projected.requires_grad:
            mixed, window, ssm_state = checkpoint(self.mix, projected, state, seq_idx, use_reentrant=False)
        else:
            mixed, window, ssm_state = self.mix(projected, state, seq_idx)
        return self.out_proj(mixed.to(hidden.dtype)), (window, ssm_state)


def _init_dt_bias(size: int, config: SSMConfig) -> torch.Tensor:
    """Inverse softplus of time steps drawn log-uniformly in [dt_min, dt_max] (Gu & Dao 2023, section 3.6)."""
    log_dt = torch.rand(size) * (math.log(config.dt_max) - math.log(config.dt_min)) + math.log(config.dt_min)
    dt = torch.exp(log_dt).clamp(min=config.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba1Mixer(_Mixer):
    # recompute stays off: the scan already keeps only its inputs for backward, and recomputing the rest
    # costs time for little memory
    def __init__(self, config: SSMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        d_inner, d_state, rank = config.d_inner, config.d_state, config.dt_rank
        self.d_inner, self.d_state, self.dt_rank = d_inner, d_state, rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1, bias=config.use_conv_bias
        )
        self.x_proj = nn.Linear(d_inner, rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.use_bias)
        with torch.no_grad():
            bound = rank**-0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(_init_dt_bias(d_inner, config))

    def _dt(self, low_rank: torch.Tensor) -> torch.Tensor:
        if type(self.dt_proj) is not nn.Linear:  # adapted (LoRA): the module computes more than its weight
            return F.softplus(self.dt_proj(low_rank).float())
        return F.softplus(F.linear(low_rank, self.dt_proj.weight).float() + self.dt_proj.bias.float())

    def mix(self, projected: torch.Tensor, state: LayerState | None, seq_idx: torch.Tensor | None):
        """in_proj output → (out_proj input, conv window, ssm state): conv, selective scan, D skip, gate."""
        x, gate = projected.chunk(2, dim=-1)  # [B, T, I] each
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        window = None if state is None else state[0]
        conv = cuda.causal_conv1d(x, weight, bias, window, seq_idx)
        x, window = conv if conv is not None else causal_conv1d(x, weight, bias, window, seq_idx)
        low_rank, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = self._dt(low_rank)
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state[1]
        reset = None if seq_idx is None else sequence_starts(seq_idx)
        scanned = cuda.selective_scan(x, dt, A, B, C, h0, reset)
        y, ssm_state = scanned if scanned is not None else selective_scan(x, dt, A, B, C, h0, reset)
        return (y + x.float() * self.D.float()) * F.silu(gate.float()), window, ssm_state

    def step(self, hidden: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        x, gate = self.in_proj(hidden).chunk(2, dim=-1)
        x, window = causal_conv1d_step(x, state[0], self.conv1d.weight[:, 0], self.conv1d.bias)
        low_rank, B, C = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        A = -torch.exp(self.A_log.float())
        y, ssm_state = selective_scan_step(x.float(), self._dt(low_rank), A, B.float(), C.float(), state[1])
        y = (y + x.float() * self.D.float()) * F.silu(gate.float())
        return self.out_proj(y.to(hidden.dtype)), (window, ssm_state)

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> LayerState:
        width = self.conv1d.kernel_size[0] - 1
        return (
            torch.zeros(batch, self.d_inner, width, device=device, dtype=dtype),
            torch.zeros(batch, self.d_inner, self.d_state, device=device),
        )


class Mamba2Mixer(_Mixer):
    def __init__(self, config: SSMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.d_inner, self.d_state = config.d_inner, config.d_state
        # SSD intermediates dominate training memory; recomputing them costs little next to the GEMMs
        self.recompute = True
        self.n_heads, self.head_dim, self.n_groups = config.n_heads, config.head_dim, config.n_groups
        self.chunk_size = config.chunk_size
        self.dt_limit = config.dt_limit
        self.conv_dim = self.d_inner + 2 * self.n_groups * self.d_state
        self.in_proj = nn.Linear(config.d_model, self.d_inner + self.conv_dim + self.n_heads, bias=config.use_bias)
        self.conv1d = nn.Conv1d(
            self.conv_dim,
            self.conv_dim,
            config.d_conv,
            groups=self.conv_dim,
            padding=config.d_conv - 1,
            bias=config.use_conv_bias,
        )
        self.dt_bias = nn.Parameter(_init_dt_bias(self.n_heads, config))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.n_heads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.n_groups, eps=config.norm_eps)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=config.use_bias)

    def _dt(self, raw: torch.Tensor) -> torch.Tensor:
        dt = F.softplus(raw.float() + self.dt_bias.float())
        low, high = self.dt_limit
        return dt if (low, high) == (0.0, math.inf) else dt.clamp(low, high)

    def _split_conv_output(self, xbc: torch.Tensor):
        return xbc.split([self.d_inner, self.n_groups * self.d_state, self.n_groups * self.d_state], dim=-1)

    def mix(self, projected: torch.Tensor, state: LayerState | None, seq_idx: torch.Tensor | None):
        """in_proj output → (out_proj input, conv window, ssm state): conv, SSD scan, D skip, gated norm."""
        batch, steps, _ = projected.shape
        gate, xbc, raw_dt = projected.split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        weight, bias = self.conv1d.weight[:, 0], self.conv1d.bias
        window = None if state is None else state[0]
        conv = cuda.causal_conv1d(xbc, weight, bias, window, seq_idx)
        xbc, window = conv if conv is not None else causal_conv1d(xbc, weight, bias, window, seq_idx)
        x, B, C = self._split_conv_output(xbc)
        x = x.reshape(batch, steps, self.n_heads, self.head_dim)
        B = B.reshape(batch, steps, self.n_groups, self.d_state)
        C = C.reshape(batch, steps, self.n_groups, self.d_state)
        dt = self._dt(raw_dt)
        A = -torch.exp(self.A_log.float())
        h0 = None if state is None else state[1]
        scanned = cuda.ssd_scan(x, dt, A, B, C, self.chunk_size, h0, seq_idx)
        if scanned is None:
            scanned = ssd_scan(x, dt, A, B, C, min(self.chunk_size, CPU_SSD_CHUNK), h0, seq_idx)
        y, ssm_state = scanned
        y = y + x.float() * self.D.float()[:, None]
        return self.norm(y.reshape(batch, steps, self.d_inner), gate), window, ssm_state

    def step(self, hidden: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        batch = hidden.shape[0]
        gate, xbc, raw_dt = self.in_proj(hidden).split([self.d_inner, self.conv_dim, self.n_heads], dim=-1)
        xbc, window = causal_conv1d_step(xbc, state[0], self.conv1d.weight[:, 0], self.conv1d.bias)
        x, B, C = self._split_conv_output(xbc)
        x = x.reshape(batch, self.n_heads, self.head_dim).float()
        A = -torch.exp(self.A_log.float())
        y, ssm_state = ssd_step(
            x,
            self._dt(raw_dt),
            A,
            B.reshape(batch, self.n_groups, self.d_state).float(),
            C.reshape(batch, self.n_groups, self.d_state).float(),
            state[1],
        )
        y = y + x * self.D.float()[:, None]
        y = self.norm(y.reshape(batch, self.d_inner), gate)
        return self.out_proj(y.to(hidden.dtype)), (window, ssm_state)

    def empty_state(self, batch: int, device=None, dtype=torch.float32) -> LayerState:
        width = self.conv1d.kernel_size[0] - 1
        return (
            torch.zeros(batch, self.conv_dim, width, device=device, dtype=dtype),
            torch.zeros(batch, self.n_heads, self.head_dim, self.d_state, device=device),
        )


class MambaBlock(nn.Module):
    """Pre-norm residual block: x + mixer(RMSNorm(x)), the residual stream kept in float32 if configured."""

    def __init__(self, config: SSMConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.residual_in_fp32 = config.residual_in_fp32
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        mixer_class = Mamba1Mixer if config.version == 1 else Mamba2Mixer
        self.mixer = mixer_class(config, layer_idx)

    def _residual(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden.float() if self.residual_in_fp32 else hidden

    def forward(
        self, hidden: torch.Tensor, state: LayerState | None = None, seq_idx: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LayerState]:
        out, new_state = self.mixer(hidden.to(self.norm.weight.dtype), state, seq_idx, norm=self.norm)
        return self._residual(hidden) + out, new_state

    def step(self, hidden: torch.Tensor, state: LayerState) -> tuple[torch.Tensor, LayerState]:
        out, new_state = self.mixer.step(self.norm(hidden.to(self.norm.weight.dtype)), state)
        return self._residual(hidden) + out, new_state
