"""RMSNorm + linear with recomputation in backward, against autograd through the two steps."""

import pytest
import torch

from medstate.ssm.config import SSMConfig
from medstate.ssm.modules import MambaBlock
from medstate.ssm.ops.norm_linear import _RMSNormLinear, rms_norm_linear, rms_norm_linear_ref


@pytest.mark.parametrize("with_bias", [True, False])
def test_matches_autograd_through_norm_and_linear(with_bias):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    norm_weight = (1 + 0.1 * torch.randn(12, dtype=torch.float64)).requires_grad_()
    weight = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    inputs = [t for t in (x, norm_weight, weight, bias) if t is not None]
    grad_out = torch.randn(2, 7, 5, dtype=torch.float64)
    fused = rms_norm_linear(x, norm_weight, 1e-5, weight, bias)
    grads = torch.autograd.grad(fused, inputs, grad_out)
    ref = rms_norm_linear_ref(x, norm_weight, 1e-5, weight, bias)
    ref_grads = torch.autograd.grad(ref, inputs, grad_out)
    torch.testing.assert_close(fused, ref, rtol=0, atol=1e-12)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *a: _RMSNormLinear.apply(a[0], a[1], 1e-5, a[2], bias), (x, norm_weight, weight)
    )


def test_frozen_input_and_weights():
    torch.manual_seed(1)
    x = torch.randn(3, 8, dtype=torch.float64)
    norm_weight = torch.randn(8, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 8, dtype=torch.float64)
    (grad,) = torch.autograd.grad(rms_norm_linear(x, norm_weight, 1e-5, weight, None).sum(), [norm_weight])
    (want,) = torch.autograd.grad(rms_norm_linear_ref(x, norm_weight, 1e-5, weight, None).sum(), [norm_weight])
    torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-12)


def _saved_bytes(run, hidden, parameters) -> int:
    """Bytes of the activations autograd keeps for backward (parameters excluded)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run(hidden)
    parameters = {p.untyped_storage().data_ptr() for p in parameters}
    return sum(size for pointer, size in storages.items() if pointer not in parameters)


@pytest.mark.parametrize("version", [1, 2])
def test_block_keeps_one_copy_of_its_input_for_the_norm(version):
    torch.manual_seed(2)
    config = SSMConfig(version=version, d_model=64, n_layer=1, d_state=16, head_dim=16, vocab_size=10)
    block = MambaBlock(config)
    hidden = torch.randn(1, 256, 64, requires_grad=True)

    def unfused(h):  # the block as two modules: norm, then the mixer from its in_proj on
        return h + block.mixer(block.norm(h))[0]

    fused = _saved_bytes(block, hidden, block.parameters())
    apart = _saved_bytes(unfused, hidden, block.parameters())
    assert apart - fused >= 2 * hidden.numel() * hidden.element_size()

    out, _ = block(hidden)
    grads = torch.autograd.grad(out.square().sum(), [hidden, *block.parameters()])
    want = torch.autograd.grad(unfused(hidden).square().sum(), [hidden, *block.parameters()])
    torch.testing.assert_close(out, unfused(hidden), rtol=0, atol=0)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
