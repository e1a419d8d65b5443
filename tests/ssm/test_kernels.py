"""Kernels against their naive step-by-step twins, forward and backward, in float64."""

import importlib

import pytest
import torch

from medstate.ssm.ops import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_step,
    selective_scan,
    selective_scan_ref,
    selective_scan_step,
    ssd_scan,
    ssd_scan_ref,
    ssd_step,
)

F64 = torch.float64
# the package re-exports the function under the module's name, so fetch the module itself
selective_scan_module = importlib.import_module("medstate.ssm.ops.selective_scan")


def _grads(outputs, weights, inputs):
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(loss, inputs)


def _assert_close_all(got, want, tol=1e-10):
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=tol, rtol=tol), (g - w).abs().max()


def _assert_matches_reference(fast, reference, inputs, extra, h0):
    """fast(*inputs, h0, extra) equals reference(...) in outputs and in the gradients of every input."""
    y, last = fast(*inputs, h0, extra)
    y_ref, last_ref = reference(*inputs, h0, extra)
    _assert_close_all([y, last], [y_ref, last_ref])
    weights = [torch.randn_like(y), torch.randn_like(last)]
    wrt = list(inputs) + ([h0] if h0 is not None else [])
    _assert_close_all(_grads([y, last], weights, wrt), _grads([y_ref, last_ref], weights, wrt), 1e-9)


def _assert_steps_match(step, scan_out, x, dt, A, B, C, h0):
    """Stepping one token at a time from h0 reproduces the scan's outputs and final state."""
    y, last = scan_out
    state = h0
    for t in range(x.shape[1]):
        y_t, state = step(x[:, t], dt[:, t], A, B[:, t], C[:, t], state)
        assert torch.allclose(y_t, y[:, t], atol=1e-5)
    assert torch.allclose(state, last, atol=1e-5)


def _mamba1_inputs(batch=2, steps=100, channels=8, n_state=4):
    x = torch.randn(batch, steps, channels, dtype=F64, requires_grad=True)
    dt = (torch.rand(batch, steps, channels, dtype=F64) * 0.5).requires_grad_()
    A = (-torch.rand(channels, n_state, dtype=F64) * 2 - 0.1).requires_grad_()
    B = torch.randn(batch, steps, n_state, dtype=F64, requires_grad=True)
    C = torch.randn(batch, steps, n_state, dtype=F64, requires_grad=True)
    h0 = torch.randn(batch, channels, n_state, dtype=F64, requires_grad=True)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("several_chunks", [False, True])
def test_selective_scan_matches_recurrence(monkeypatch, with_state, packed, several_chunks):
    if several_chunks:  # chunks of 32 steps: exercises the chunk-to-chunk state and adjoint hand-off
        monkeypatch.setattr(selective_scan_module, "ELEMENTS_PER_CHUNK", 2 * 8 * 4 * 32)
    x, dt, A, B, C, h0 = _mamba1_inputs(steps=100)  # 100: not a multiple of the 16-step block
    h0 = h0 if with_state else None
    reset = None
    if packed:
        reset = torch.zeros(2, 100, dtype=torch.bool)
        reset[0, 37] = reset[1, 16] = reset[1, 64] = reset[1, 99] = True
    _assert_matches_reference(selective_scan, selective_scan_ref, (x, dt, A, B, C), reset, h0)


def test_selective_scan_float32_and_step():
    x, dt, A, B, C, h0 = (t.detach().float() for t in _mamba1_inputs(steps=40))
    _assert_steps_match(selective_scan_step, selective_scan(x, dt, A, B, C, h0), x, dt, A, B, C, h0)


def _ssd_inputs(batch=2, steps=100, heads=4, head_dim=3, groups=2, n_state=5):
    x = torch.randn(batch, steps, heads, head_dim, dtype=F64, requires_grad=True)
    dt = (torch.rand(batch, steps, heads, dtype=F64) * 0.5).requires_grad_()
    A = (-torch.rand(heads, dtype=F64) * 2 - 0.1).requires_grad_()
    B = torch.randn(batch, steps, groups, n_state, dtype=F64, requires_grad=True)
    C = torch.randn(batch, steps, groups, n_state, dtype=F64, requires_grad=True)
    h0 = torch.randn(batch, heads, head_dim, n_state, dtype=F64, requires_grad=True)
    return x, dt, A, B, C, h0


@pytest.mark.parametrize("chunk", [16, 32, 128])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("fast_decay", [False, True])
def test_ssd_matches_recurrence(chunk, with_state, packed, fast_decay):
    x, dt, A, B, C, h0 = _ssd_inputs(steps=100)
    if fast_decay:  # heads 0 and 2 decay by up to exp(-30) per step: decays within a chunk reach the clamp
        dt = (dt * torch.tensor([60.0, 1.0, 60.0, 1.0], dtype=F64)).detach().requires_grad_()
    h0 = h0 if with_state else None
    seq_idx = None
    if packed:  # boundaries inside chunks, on a chunk edge (t=64) and at the very end
        seq_idx = torch.zeros(2, 100, dtype=torch.long)
        seq_idx[0, 37:] = 1
        seq_idx[1, 16:] = 1
        seq_idx[1, 64:] = 2
        seq_idx[1, 99:] = 3

    def chunked(x, dt, A, B, C, h0, seq_idx):
        return ssd_scan(x, dt, A, B, C, chunk, h0, seq_idx)

    _assert_matches_reference(chunked, ssd_scan_ref, (x, dt, A, B, C), seq_idx, h0)


def test_ssd_step_matches_scan():
    x, dt, A, B, C, h0 = (t.detach().float() for t in _ssd_inputs(steps=30))
    _assert_steps_match(ssd_step, ssd_scan(x, dt, A, B, C, 16, h0), x, dt, A, B, C, h0)


@pytest.mark.parametrize("packed", [False, True])
def test_causal_conv_matches_reference(packed):
    x = torch.randn(2, 30, 6, dtype=F64, requires_grad=True)
    weight = torch.randn(6, 4, dtype=F64, requires_grad=True)
    bias = torch.randn(6, dtype=F64, requires_grad=True)
    window = torch.randn(2, 6, 3, dtype=F64, requires_grad=True)
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(2, 30, dtype=torch.long)
        seq_idx[0, 5:] = 1
        seq_idx[1, 1:] = 1
        seq_idx[1, 28:] = 2
    y, new_window = causal_conv1d(x, weight, bias, window, seq_idx)
    y_ref = causal_conv1d_ref(x, weight, bias, window, seq_idx)
    assert torch.allclose(y, y_ref, atol=1e-12)
    w = torch.randn_like(y)
    _assert_close_all(_grads([y], [w], [x, weight, bias, window]), _grads([y_ref], [w], [x, weight, bias, window]))
    # the carried window is the last 3 inputs of the row's last sequence; earlier sequences are zeroed
    expected = x[:, -3:].transpose(1, 2).detach().clone()
    if packed:
        expected[1, :, 0] = 0  # position 27 belongs to sequence 1, the row ends in sequence 2
    assert torch.equal(new_window.detach(), expected)


def test_causal_conv_step_continues_window():
    x = torch.randn(1, 12, 5)
    weight, bias = torch.randn(5, 4), torch.randn(5)
    y, _ = causal_conv1d(x, weight, bias)
    window = torch.zeros(1, 5, 3)
    for t in range(12):
        y_t, window = causal_conv1d_step(x[:, t], window, weight, bias)
        assert torch.allclose(y_t, y[:, t], atol=1e-6)
