"""A mixer on the CPU runs its rows in cache-sized pieces: outputs and carried states must equal one call over all
rows (the engine before pieces), with an initial state and packed sequences too."""

import pytest
import torch

import medstate.ssm.modules as modules
from medstate.ssm.config import SSMConfig


@pytest.mark.parametrize("version", [1, 2])
def test_pieces_equal_one_call_over_all_rows(version, monkeypatch):
    torch.manual_seed(0)
    config = SSMConfig(version=version, d_model=16, n_layer=1, d_state=8, head_dim=8, vocab_size=1)
    mixer = (modules.Mamba1Mixer if version == 1 else modules.Mamba2Mixer)(config)
    hidden = torch.randn(7, 20, 16, requires_grad=True)
    state = tuple(t.normal_() for t in mixer.empty_state(7))
    seq_idx = torch.tensor([[0] * 12 + [1] * 8] * 7)
    monkeypatch.setattr(modules, "cpu_piece_rows", lambda rows, steps, width: rows)
    whole, (whole_window, whole_state) = mixer(hidden, state, seq_idx if version == 2 else None)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), hidden)
    monkeypatch.undo()
    # a cache so small that every row is its own piece, then 3 rows per piece
    for cache in (1, 3 * 20 * mixer.in_proj.out_features * 4 * 4):
        monkeypatch.setattr(modules, "last_level_cache_bytes", lambda c=cache: c)
        assert modules.cpu_piece_rows(7, 20, mixer.in_proj.out_features) < 7
        out, (window, ssm_state) = mixer(hidden, state, seq_idx if version == 2 else None)
        (grad,) = torch.autograd.grad(out.square().sum(), hidden)
        assert torch.allclose(out, whole, atol=1e-5)
        assert torch.allclose(window, whole_window, atol=1e-6)
        assert torch.allclose(ssm_state, whole_state, atol=1e-5)
        assert torch.allclose(grad, grad_whole, atol=1e-4)


def test_piece_rows_balance_the_pieces(monkeypatch):
    monkeypatch.setattr(modules, "last_level_cache_bytes", lambda: 4 * 100 * 10 * 4 * 10)  # 10 rows per quarter
    assert modules.cpu_piece_rows(25, 100, 10) == 9  # 3 pieces of 9, 9, 7 rather than 10, 10, 5
    assert modules.cpu_piece_rows(8, 100, 10) == 8
