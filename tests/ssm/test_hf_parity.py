"""Parity with Hugging Face transformers on identical weights (tiny random models built in the test)."""

import json

import pytest
import torch

from medstate.ssm import load_pretrained

transformers = pytest.importorskip("transformers")


def _perturb(model):
    """Random init leaves many parameters at 0/1; perturb them so the parity check means something."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "A_log" not in name and "dt" not in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


TINY = {"vocab_size": 97, "hidden_size": 32, "state_size": 8, "num_hidden_layers": 2, "expand": 2, "conv_kernel": 4}


def hf_mamba1(tie=True):
    config = transformers.MambaConfig(**TINY, tie_word_embeddings=tie)
    return _perturb(transformers.MambaForCausalLM(config))


def hf_mamba2(n_groups=2, tie=True, chunk_size=16):
    config = transformers.Mamba2Config(
        **TINY, num_heads=8, head_dim=8, n_groups=n_groups, chunk_size=chunk_size, tie_word_embeddings=tie
    )
    return _perturb(transformers.Mamba2ForCausalLM(config))


MODELS = {
    "mamba1": hf_mamba1,
    "mamba1-untied": lambda: hf_mamba1(tie=False),
    "mamba2-groups2": hf_mamba2,
    "mamba2-groups1-untied": lambda: hf_mamba2(n_groups=1, tie=False),
}


@pytest.fixture(params=list(MODELS))
def pair(request, tmp_path):
    hf = MODELS[request.param]()
    hf.save_pretrained(tmp_path / "hf")
    return hf, load_pretrained(tmp_path / "hf")


def test_logits_match(pair):
    hf, ours = pair
    ids = torch.randint(0, 97, (2, 45))  # 45: not a multiple of the chunk size (16)
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_gradients_match(pair):
    hf, ours = pair
    ids = torch.randint(0, 97, (2, 45))
    target = torch.randint(0, 97, (2, 45))

    def loss(logits):
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten())

    loss(hf(ids).logits).backward()
    loss(ours(ids).logits).backward()
    hf_grads = dict(hf.named_parameters())
    compared = 0
    for name, p in ours.named_parameters():
        want = hf_grads[name].grad
        rel = (p.grad - want).abs().max() / want.abs().max().clamp_min(1e-12)
        assert rel < 1e-3, (name, rel)
        compared += 1
    assert compared == len(list(hf.parameters()))


def test_our_checkpoint_loads_in_transformers(pair, tmp_path):
    hf, ours = pair
    ours.save_pretrained(tmp_path / "ours")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(hf)
    ids = torch.randint(0, 97, (1, 33))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("version", [1, 2])
def test_mamba_ssm_native_layout(tmp_path, version):
    """config.json with d_model/n_layer/ssm_cfg + pytorch_model.bin, names as mamba_ssm writes them."""
    hf = hf_mamba1() if version == 1 else hf_mamba2()
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    native = tmp_path / "native"
    native.mkdir()
    torch.save(state, native / "pytorch_model.bin")
    ssm_cfg = (
        {"layer": "Mamba1", "d_state": 8}
        if version == 1
        else {
            "layer": "Mamba2",
            "d_state": 8,
            "headdim": 8,
            "ngroups": 2,
            "chunk_size": 16,
        }
    )
    config = {
        "d_model": 32,
        "d_intermediate": 0,
        "n_layer": 2,
        "vocab_size": 90,
        "ssm_cfg": ssm_cfg,
        "attn_layer_idx": [],
        "attn_cfg": {},
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": 97,
        "tie_embeddings": True,
    }
    (native / "config.json").write_text(json.dumps(config))
    ours = load_pretrained(native)
    assert ours.config.vocab_size == 97
    ids = torch.randint(0, 97, (2, 21))
    with torch.no_grad():
        assert (ours(ids).logits - hf(ids).logits).abs().max() < 1e-4
