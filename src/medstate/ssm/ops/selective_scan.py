"""Mamba-1 selective scan on the CPU: chunked, bounded memory, with a hand-written backward.

The recurrence (Gu & Dao 2023, eq. 2 with zero-order-hold on A and Euler on B), per channel d and state n:

    h_t[d, n] = exp(dt_t[d] * A[d, n]) * h_{t-1}[d, n] + dt_t[d] * B_t[n] * x_t[d]
    y_t[d]    = sum_n C_t[n] * h_t[d, n]

The decay differs per (d, n), so the matmul form of SSD does not apply. We process the sequence in chunks
(memory: one chunk's [B, D, chunk, N] tensors, never the whole sequence) and scan each chunk with a two-level
scheme that only multiplies decays (numerically safe; no exp(-cumsum) that could overflow):

  1. the chunk is cut into L1 blocks of L2 = 16 steps, laid out [L2, B, D, L1, N] so each step is contiguous;
     a 16-step loop scans all blocks at once from a zero state;
  2. an L1-step loop carries the state across blocks (decay product of a block times the carry, plus the
     block's last local state);
  3. one fused multiply-add adds each block's carried state times the running decay product.

The backward pass recomputes a chunk's states from the chunk's saved start state and runs the same two-level
scan in reverse for the adjoint g_t = C_t * dy_t + exp(dt_{t+1} A) * g_{t+1}; all parameter gradients then
follow elementwise from (g, h_{t-1}). A `reset` mask (packed sequences) zeroes the decay at the first step of
each new sequence, so no state crosses a boundary in either direction.
"""

from __future__ import annotations

import torch

BLOCK = 16
ELEMENTS_PER_CHUNK = 1 << 20  # 4 MB per [chunk, B, D, N] tensor: stays cache-friendly


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _chunk_length(batch: int, channels: int, n_state: int) -> int:
    per_step = max(1, batch * channels * n_state)
    blocks = max(1, ELEMENTS_PER_CHUNK // (per_step * BLOCK))
    return BLOCK * min(blocks, 256)


def _to_blocks(t: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """[B, L, D] → [L2, B, D, L1] contiguous (time t = block * L2 + step)."""
    b, _, d = t.shape
    return t.reshape(b, n_blocks, BLOCK, d).permute(2, 0, 3, 1).contiguous()


def _from_blocks(t: torch.Tensor) -> torch.Tensor:
    """[L2, B, D, L1] → [B, L, D]."""
    steps, b, d, n_blocks = t.shape
    return t.permute(1, 3, 0, 2).reshape(b, n_blocks * steps, d)


def _state_blocks(t: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """B or C [B, L, N] → [L2, B, 1, L1, N]."""
    b, _, n = t.shape
    return t.reshape(b, n_blocks, BLOCK, n).permute(2, 0, 1, 3).unsqueeze(2).contiguous()


def _state_from_blocks(t: torch.Tensor) -> torch.Tensor:
    """[L2, B, L1, N] → [B, L, N]."""
    steps, b, n_blocks, n = t.shape
    return t.permute(1, 2, 0, 3).reshape(b, n_blocks * steps, n)


def _scan_blocks(decay: torch.Tensor, states: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """In place: states[j] becomes h at that step, h_t = decay_t * h_{t-1} + input_t, h_{-1} = h0.

    decay, states: [L2, B, D, L1, N]; h0: [B, D, N]. Returns the final state [B, D, N]."""
    prod = torch.empty_like(decay)  # running decay product within each block (torch.cumprod is slow here)
    prod[0] = decay[0]
    for j in range(1, BLOCK):
        states[j].addcmul_(decay[j], states[j - 1])
        torch.mul(prod[j - 1], decay[j], out=prod[j])
    last_prod = prod[-1].permute(2, 0, 1, 3).contiguous()  # [L1, B, D, N]
    last_state = states[-1].permute(2, 0, 1, 3).contiguous()
    carry = torch.empty_like(last_state)
    running = h0
    for k in range(carry.shape[0]):
        carry[k] = running
        running = torch.addcmul(last_state[k], last_prod[k], running)
    states.addcmul_(prod, carry.permute(1, 2, 0, 3))
    return running


def _scan_blocks_reverse(decay: torch.Tensor, adjoint: torch.Tensor) -> None:
    """In place: adjoint[t] becomes g_t = input_t + decay_{t+1} * g_{t+1} within the chunk (whatever comes
    after the chunk must already be folded into the last input)."""
    suffix = torch.empty_like(decay)  # suffix[j] = prod_{i > j} decay[i] within the block
    suffix[-1] = 1.0
    for j in range(BLOCK - 2, -1, -1):
        adjoint[j].addcmul_(decay[j + 1], adjoint[j + 1])
        torch.mul(suffix[j + 1], decay[j + 1], out=suffix[j])
    first_prod = suffix[0].permute(2, 0, 1, 3).contiguous()  # [L1, B, D, N]
    first_adj = adjoint[0].permute(2, 0, 1, 3).contiguous()
    first_decay = decay[0].permute(2, 0, 1, 3).contiguous()
    carry = torch.empty_like(first_adj)
    incoming = torch.zeros_like(first_adj[0])  # decay at the next block's start x g there
    for k in range(carry.shape[0] - 1, -1, -1):
        carry[k] = incoming
        incoming = first_decay[k] * torch.addcmul(first_adj[k], first_prod[k], incoming)
    adjoint.addcmul_(suffix, carry.permute(1, 2, 0, 3))


class _ChunkInputs:
    """One chunk's inputs in block layout, built from [B, D, L] / [B, N, L] slices."""

    def __init__(self, x, dt, A, B, C, keep, start, stop):
        n_blocks = (stop - start) // BLOCK
        self.n_blocks = n_blocks
        self.x = _to_blocks(x[:, start:stop], n_blocks)
        self.dt = _to_blocks(dt[:, start:stop], n_blocks)
        self.B = _state_blocks(B[:, start:stop], n_blocks)
        self.C = _state_blocks(C[:, start:stop], n_blocks)
        self.decay = torch.exp(self.dt.unsqueeze(-1) * A[:, None, :])
        if keep is not None:
            kept = keep[:, start:stop].reshape(keep.shape[0], n_blocks, BLOCK).permute(2, 0, 1)
            self.decay.mul_(kept[:, :, None, :, None])
        self.dtx = self.dt * self.x

    def inputs(self) -> torch.Tensor:
        return self.dtx.unsqueeze(-1) * self.B


def _pad_time(t: torch.Tensor, steps: int) -> torch.Tensor:
    return t if t.shape[1] == steps else torch.nn.functional.pad(t, (0, 0, 0, steps - t.shape[1]))


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dt, A, B, C, h0, keep):
        batch, steps, channels = x.shape
        padded = -(-steps // BLOCK) * BLOCK
        x, dt, B, C = (_pad_time(t, padded) for t in (x, dt, B, C))
        if keep is not None:
            keep = torch.nn.functional.pad(keep, (0, padded - steps), value=1.0)
        chunk = _chunk_length(batch, channels, A.shape[1])
        y = x.new_empty(batch, padded, channels)
        starts = list(range(0, padded, chunk))
        chunk_states = x.new_empty(len(starts), batch, channels, A.shape[1])
        state = h0
        for i, start in enumerate(starts):
            stop = min(start + chunk, padded)
            part = _ChunkInputs(x, dt, A, B, C, keep, start, stop)
            chunk_states[i] = state
            states = part.inputs()
            state = _scan_blocks(part.decay, states, state)
            y[:, start:stop] = _from_blocks((states * part.C).sum(-1))
        ctx.save_for_backward(x, dt, A, B, C, keep, chunk_states)
        ctx.steps, ctx.chunk = steps, chunk
        return y[:, :steps], state

    @staticmethod
    def backward(ctx, grad_y, grad_final):
        x, dt, A, B, C, keep, chunk_states = ctx.saved_tensors
        steps, chunk = ctx.steps, ctx.chunk
        padded = x.shape[1]
        grad_y = _pad_time(grad_y if grad_y is not None else x.new_zeros(x.shape[0], steps, x.shape[2]), padded)
        grad_x, grad_dt = torch.empty_like(x), torch.empty_like(dt)
        grad_B, grad_C = torch.empty_like(B), torch.empty_like(C)
        grad_A = torch.zeros_like(A)
        # adjoint entering the end of the current chunk from the right (already multiplied by the decay)
        incoming = grad_final if grad_final is not None else torch.zeros_like(chunk_states[0])
        starts = list(range(0, padded, chunk))
        for i in range(len(starts) - 1, -1, -1):
            start, stop = starts[i], min(starts[i] + chunk, padded)
            part = _ChunkInputs(x, dt, A, B, C, keep, start, stop)
            h0 = chunk_states[i]
            states = part.inputs()
            _scan_blocks(part.decay, states, h0)
            dy = _to_blocks(grad_y[:, start:stop], part.n_blocks)
            adjoint = dy.unsqueeze(-1) * part.C
            adjoint[-1, :, :, -1] += incoming
            _scan_blocks_reverse(part.decay, adjoint)
            previous = torch.empty_like(states)
            previous[1:] = states[:-1]
            previous[0, :, :, 1:] = states[-1, :, :, :-1]
            previous[0, :, :, 0] = h0
            grad_log_decay = adjoint * previous * part.decay  # d loss / d (dt * A)
            del previous
            g_b = (adjoint * part.B).sum(-1)
            grad_dt_blocks = (grad_log_decay * A[:, None, :]).sum(-1) + part.x * g_b
            grad_x[:, start:stop] = _from_blocks(part.dt * g_b)
            grad_dt[:, start:stop] = _from_blocks(grad_dt_blocks)
            grad_B[:, start:stop] = _state_from_blocks((adjoint * part.dtx.unsqueeze(-1)).sum(2))
            grad_C[:, start:stop] = _state_from_blocks((states * dy.unsqueeze(-1)).sum(2))
            grad_A += (grad_log_decay * part.dt.unsqueeze(-1)).sum((0, 1, 3))
            incoming = part.decay[0, :, :, 0] * adjoint[0, :, :, 0]
        grad_h0 = incoming if ctx.needs_input_grad[5] else None
        s = steps
        return grad_x[:, :s], grad_dt[:, :s], grad_A, grad_B[:, :s], grad_C[:, :s], grad_h0, None


def selective_scan(
    x: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    reset: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective scan without the D skip and gate.

    x, dt: [B, T, D] (dt positive, i.e. after softplus); A: [D, N] (negative); B, C: [B, T, N];
    initial_state: [B, D, N] or None (zeros); reset: [B, T] bool, True where the state is cleared before the
    step (the first token of a packed sequence). Returns (y [B, D, T], final state [B, D, N]), computed in
    float32 (float64 if x is float64) whatever the input dtype.
    """
    dtype = _compute_dtype(x)
    batch, _, channels = x.shape
    if initial_state is None:
        initial_state = x.new_zeros(batch, channels, A.shape[1], dtype=dtype)
    keep = None if reset is None else (~reset).to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        y, final = _SelectiveScan.apply(
            x.to(dtype), dt.to(dtype), A.to(dtype), B.to(dtype), C.to(dtype), initial_state.to(dtype), keep
        )
    return y, final


def selective_scan_ref(x, dt, A, B, C, initial_state=None, reset=None):
    """Reference twin: the recurrence one step at a time (slow; autograd through the loop)."""
    batch, steps, channels = x.shape
    h = initial_state if initial_state is not None else x.new_zeros(batch, channels, A.shape[1])
    outputs = []
    for t in range(steps):
        decay = torch.exp(dt[:, t, :, None] * A)
        if reset is not None:
            decay = decay * (~reset[:, t]).to(x.dtype)[:, None, None]
        h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        outputs.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(outputs, dim=1), h


def selective_scan_step(x, dt, A, B, C, state):
    """One decoding step: x, dt [B, D]; B, C [B, N]; state [B, D, N] → (y [B, D], new state)."""
    decay = torch.exp(dt.unsqueeze(-1) * A)
    state = decay * state + (dt * x).unsqueeze(-1) * B.unsqueeze(1)
    return (state * C.unsqueeze(1)).sum(-1), state
