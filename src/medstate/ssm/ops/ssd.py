"""Mamba-2 state-space duality (SSD) scan, chunked, in PyTorch.

Per head h (scalar decay a_t = dt_t * A_h) and group g(h) (shared B, C):

    H_t = exp(a_t) * H_{t-1} + dt_t * x_t B_t^T        H_t: [P, N]
    y_t = H_t C_t

Dao & Gu (2024), section 6: cut the sequence into chunks of length Q. Within a chunk the output is a masked
"attention" (C_i . B_j) * exp(cum_i - cum_j) * dt_j x_j for j <= i (two matmuls); each chunk also emits its
end state sum_j exp(cum_last - cum_j) B_j dt_j x_j; a short recurrence over chunks passes the states along;
each position reads its chunk's start state through C_i * exp(cum_i). Cumulative sums, exponentials and the
inter-chunk recurrence run in float32 (float64 for float64 input) even under bf16 autocast; the three
intra-chunk contractions follow autocast (bf16 matmuls on AMX when enabled).

Packed sequences: with `seq_idx` (non-decreasing per row) the intra-chunk mask also requires
seq_idx_i == seq_idx_j, a chunk's end state only gathers positions of the chunk's last sequence, a carried
state survives a chunk only if no sequence starts inside it, and a position reads the carried state only if
it belongs to the sequence that was running before the chunk. Autograd differentiates all of it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Decays below exp(-30) ~ 1e-13 are clamped to it: invisible next to O(1) terms in float32 (eps 1e-7), and it
# keeps exp() and every product downstream (scores x decay, state x decay) out of the denormal range, where
# x86 arithmetic is many times slower.
MIN_LOG_DECAY = -30.0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def ssd_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    chunk_size: int,
    initial_state: torch.Tensor | None = None,
    seq_idx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [b, T, H, P]; dt: [b, T, H] (positive); A: [H] (negative); B, C: [b, T, G, N];
    initial_state: [b, H, P, N] or None; seq_idx: [b, T] integer or None.
    Returns (y [b, T, H, P] without the D skip, final state [b, H, P, N] in the compute dtype)."""
    dtype = _compute_dtype(x)
    batch, steps, n_heads, head_dim = x.shape
    n_groups, n_state = B.shape[2], B.shape[3]
    heads_per_group = n_heads // n_groups
    q = chunk_size
    pad = -steps % q
    n_chunks = (steps + pad) // q
    autocast_on = torch.is_autocast_enabled(x.device.type)
    mm_dtype = torch.get_autocast_dtype(x.device.type) if autocast_on else dtype

    with torch.autocast(x.device.type, enabled=False):
        dt, x, B, C = dt.to(dtype), x.to(dtype), B.to(dtype), C.to(dtype)
        if pad:
            dt, x, B, C = (F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)) for t in (dt, x, B, C))
        xdt = (x * dt.unsqueeze(-1)).reshape(batch, n_chunks, q, n_groups, heads_per_group, head_dim)
        Bc = B.reshape(batch, n_chunks, q, n_groups, n_state)
        Cc = C.reshape(batch, n_chunks, q, n_groups, n_state)
        # log decays, [b, c, G, Hg, Q]
        log_decay = (dt * A.to(dtype)).reshape(batch, n_chunks, q, n_groups, heads_per_group).permute(0, 1, 3, 4, 2)
        cum = torch.cumsum(log_decay, dim=-1)

        # 1. intra-chunk output. The causal (and same-sequence) mask is applied to the per-group scores, not
        # to the per-head decays: cheaper, and the decays can then be clamped instead of set to -inf
        # (exp of -inf and of denormal-producing arguments is several times slower on the CPU).
        causal = torch.ones(q, q, dtype=torch.bool, device=x.device).tril()
        if seq_idx is not None:
            # padding continues the row's last sequence (dt = 0 there: no input, no decay)
            seq = torch.cat([seq_idx, seq_idx[:, -1:].expand(-1, pad)], dim=1) if pad else seq_idx
            seq_c = seq.reshape(batch, n_chunks, q)
            mask = ((seq_c.unsqueeze(-1) == seq_c.unsqueeze(-2)) & causal)[:, :, None]  # [b, c, 1, Q, Q]
        else:
            mask = causal
        scores = torch.einsum("bcign,bcjgn->bcgij", Cc.to(mm_dtype), Bc.to(mm_dtype)).to(dtype) * mask
        # cum is non-increasing, so cum_i - cum_j <= 0 wherever the mask keeps a score
        decay_matrix = torch.exp((cum.unsqueeze(-1) - cum.unsqueeze(-2)).clamp(MIN_LOG_DECAY, 0.0))
        weights = (scores.unsqueeze(3) * decay_matrix).to(mm_dtype)  # [b, c, G, Hg, Q, Q]
        y = torch.einsum("bcghij,bcjghp->bcighp", weights, xdt.to(mm_dtype)).to(dtype)

        # 2. each chunk's end state
        to_end = torch.exp((cum[..., -1:] - cum).clamp_min(MIN_LOG_DECAY))  # [b, c, G, Hg, Q]
        if seq_idx is not None:
            to_end = to_end * (seq_c == seq_c[:, :, -1:])[:, :, None, None].to(dtype)
        weighted_x = (xdt * to_end.permute(0, 1, 4, 2, 3).unsqueeze(-1)).to(mm_dtype)
        chunk_states = torch.einsum("bcjgn,bcjghp->bcghpn", Bc.to(mm_dtype), weighted_x).to(dtype)

        # 3. pass states from chunk to chunk (sequential over chunks: T / Q steps)
        chunk_decay = torch.exp(cum[..., -1].clamp_min(MIN_LOG_DECAY))  # [b, c, G, Hg]
        if seq_idx is not None:
            before = torch.cat([seq_c[:, :1, :1], seq_c[:, :-1, -1:]], dim=1)  # seq running before each chunk
            survives = (seq_c[:, :, -1:] == before).to(dtype)  # [b, c, 1]
            chunk_decay = chunk_decay * survives.unsqueeze(-1)
        state = (
            initial_state.to(dtype).reshape(batch, n_groups, heads_per_group, head_dim, n_state)
            if initial_state is not None
            else xdt.new_zeros(batch, n_groups, heads_per_group, head_dim, n_state)
        )
        start_states = []
        # unbind once: indexing [:, c] in the loop would make autograd zero-fill a full-size gradient per chunk
        for decay_c, states_c in zip(chunk_decay.unbind(1), chunk_states.unbind(1)):
            start_states.append(state)
            state = torch.addcmul(states_c, decay_c[..., None, None], state)
        starts = torch.stack(start_states, dim=1)  # [b, c, G, Hg, P, N]

        # 4. read the chunk's start state
        from_start = torch.exp(cum.clamp_min(MIN_LOG_DECAY))  # [b, c, G, Hg, Q]
        if seq_idx is not None:
            from_start = from_start * (seq_c == before)[:, :, None, None].to(dtype)
        y_carry = torch.einsum("bcign,bcghpn->bcighp", Cc.to(mm_dtype), starts.to(mm_dtype)).to(dtype)
        y = y + y_carry * from_start.permute(0, 1, 4, 2, 3).unsqueeze(-1)

    y = y.reshape(batch, n_chunks * q, n_heads, head_dim)[:, :steps]
    return y, state.reshape(batch, n_heads, head_dim, n_state)


def ssd_scan_ref(x, dt, A, B, C, initial_state=None, seq_idx=None):
    """Reference twin: the recurrence one step at a time."""
    batch, steps, n_heads, head_dim = x.shape
    heads_per_group = n_heads // B.shape[2]
    Bh = B.repeat_interleave(heads_per_group, dim=2)
    Ch = C.repeat_interleave(heads_per_group, dim=2)
    h = initial_state if initial_state is not None else x.new_zeros(batch, n_heads, head_dim, B.shape[3])
    outputs = []
    for t in range(steps):
        decay = torch.exp(dt[:, t] * A)  # [b, H]
        if seq_idx is not None and t > 0:
            decay = decay * (seq_idx[:, t] == seq_idx[:, t - 1]).to(x.dtype)[:, None]
        h = decay[:, :, None, None] * h + (dt[:, t, :, None] * x[:, t]).unsqueeze(-1) * Bh[:, t].unsqueeze(2)
        outputs.append((h * Ch[:, t].unsqueeze(2)).sum(-1))
    return torch.stack(outputs, dim=1), h


def ssd_step(x, dt, A, B, C, state):
    """One decoding step: x [b, H, P]; dt [b, H]; B, C [b, G, N]; state [b, H, P, N] → (y [b, H, P], state)."""
    heads_per_group = x.shape[1] // B.shape[1]
    Bh = B.repeat_interleave(heads_per_group, dim=1)
    Ch = C.repeat_interleave(heads_per_group, dim=1)
    decay = torch.exp(dt * A)
    state = decay[:, :, None, None] * state + (dt.unsqueeze(-1) * x).unsqueeze(-1) * Bh.unsqueeze(2)
    return (state * Ch.unsqueeze(2)).sum(-1), state
