"""Fused CUDA kernels (mamba_ssm, causal_conv1d) against the PyTorch path. Skipped without CUDA + kernels."""

import pytest
import torch

from medstate.ssm import MambaLM, SSMConfig
from medstate.ssm.ops import cuda

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(cuda.kernels() is None, reason="needs mamba_ssm and causal_conv1d"),
]


def _fused_vs_torch(model, **kwargs):
    """Run the same CUDA model with the fused kernels and with them disabled (the PyTorch path)."""
    fused = model(**kwargs)
    saved = cuda.usable
    cuda.usable = lambda x: None
    try:
        reference = model(**kwargs)
    finally:
        cuda.usable = saved
    return fused, reference


@pytest.mark.parametrize("version", [1, 2])
def test_fused_forward_and_gradients_match_torch_path(version):
    torch.manual_seed(0)
    config = SSMConfig(version=version, vocab_size=128, d_model=64, n_layer=2, d_state=16, head_dim=16)
    model = MambaLM(config).cuda()
    ids = torch.randint(0, 128, (2, 300), device="cuda")
    fused, reference = _fused_vs_torch(model, input_ids=ids, return_state=True)
    assert (fused.logits - reference.logits).abs().max() < 1e-3
    for a, b in zip(fused.state.ssm, reference.state.ssm):
        assert (a - b).abs().max() < 1e-3
    fused.logits.float().square().mean().backward(retain_graph=True)
    fused_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference.logits.float().square().mean().backward()
    for a, p in zip(fused_grads, model.parameters()):
        assert (a - p.grad).abs().max() <= 1e-2 * p.grad.abs().max() + 1e-6


def test_fused_packed_sequences_match_torch_path():
    torch.manual_seed(0)
    config = SSMConfig(version=2, vocab_size=128, d_model=64, n_layer=2, d_state=16, head_dim=16)
    model = MambaLM(config).cuda()
    ids = torch.randint(0, 128, (1, 200), device="cuda")
    seq_idx = torch.zeros(1, 200, dtype=torch.long, device="cuda")
    seq_idx[:, 70:] = 1
    seq_idx[:, 150:] = 2
    fused, reference = _fused_vs_torch(model, input_ids=ids, seq_idx=seq_idx)
    assert (fused.logits - reference.logits).abs().max() < 1e-3
