"""LoRA through PEFT on medstate's Mamba models: every adapter is on the compute path (the fused CPU ops and the
fused loss fall back when their module is adapted), targets are checked, PEFT's own loader reads our adapters, and
merging gives the same logits, also in HF transformers."""

import pytest
import torch

from medstate import MedstateError
from medstate.ssm import MambaLM, SSMConfig, load_pretrained
from medstate.ssm.lora import LoraSettings, add_lora, merge_lora, resolve_targets

peft = pytest.importorskip("peft")

MAMBA1 = dict(version=1, vocab_size=48, d_model=16, n_layer=2, d_state=4, expand=2)
MAMBA2 = dict(version=2, vocab_size=48, d_model=16, n_layer=2, d_state=8, head_dim=8, chunk_size=8)
EVERYTHING = {1: ["in_proj", "x_proj", "dt_proj", "out_proj", "embeddings", "lm_head"],
              2: ["in_proj", "out_proj", "embeddings", "lm_head"]}  # fmt: skip


def _model(sizes, seed=0):
    torch.manual_seed(seed)
    return MambaLM(SSMConfig(**sizes)).train()


def _ids(n=2, length=12):
    return torch.randint(0, 48, (n, length), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("sizes", [MAMBA1, MAMBA2], ids=["mamba1", "mamba2"])
def test_every_adapter_gets_a_gradient_and_moves_the_output(sizes, device):
    """On CUDA the fused kernels (mamba-ssm, causal-conv1d) run the scans: no adapter may be bypassed there either."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = _model(sizes).to(device)
    model = add_lora(model, LoraSettings(EVERYTHING[sizes["version"]], rank=2, alpha=4, dropout=0.0))
    adapters = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert adapters and all(p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    ids = _ids().to(device)
    for fused in (False, True):  # the logits' loss, and the fused loss that never forms logits
        model.zero_grad()
        with torch.no_grad():  # one of each pair starts at zero (so the other gets no gradient): give all values
            for p in adapters.values():
                p.normal_(0, 0.1)
        model(ids, labels=ids, return_logits=not fused).loss.backward()
        silent = [n for n, p in adapters.items() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not silent, f"adapters without gradient (fused loss: {fused}): {silent}"
    model.eval()
    with torch.no_grad():
        base = model(ids).logits
        for name, p in adapters.items():
            if "_B" in name:  # each adapter alone changes the logits
                kept = p.clone()
                p.mul_(3.0)
                assert not torch.allclose(model(ids).logits, base, atol=1e-6), name
                p.copy_(kept)


def test_targets_are_checked():
    model = _model(MAMBA2)
    assert sorted(resolve_targets(model, [])) == [
        f"backbone.layers.{i}.mixer.{n}" for i in (0, 1) for n in ("in_proj", "out_proj")
    ]
    assert resolve_targets(model, [r"re:backbone\.layers\.1\..*_proj"]) == [
        "backbone.layers.1.mixer.in_proj", "backbone.layers.1.mixer.out_proj"]  # fmt: skip
    with pytest.raises(MedstateError, match="'x_proj' matches no module"):
        add_lora(model, LoraSettings(["in_proj", "x_proj"]))  # x_proj is Mamba-1's; one bad target is an error
    with pytest.raises(MedstateError, match=r"conv1d.*Conv1d"):
        add_lora(model, LoraSettings(["conv1d"]))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing half-applied


@pytest.mark.parametrize("sizes", [MAMBA1, MAMBA2], ids=["mamba1", "mamba2"])
def test_merged_model_computes_what_the_adapted_one_did(sizes, tmp_path):
    transformers = pytest.importorskip("transformers")
    base = _model(sizes)
    base.save_pretrained(tmp_path / "base")
    settings = LoraSettings(EVERYTHING[sizes["version"]], rank=2, dropout=0.0)
    model = add_lora(load_pretrained(tmp_path / "base"), settings, base=tmp_path / "base")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    model.eval()
    ids = _ids()
    with torch.no_grad():
        adapted = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")  # PEFT's files
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    # PEFT's own loader on a fresh copy of the base model reads the same adapters
    fresh = peft.PeftModel.from_pretrained(load_pretrained(tmp_path / "base"), tmp_path / "adapter").eval()
    reloaded = load_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        assert torch.allclose(fresh(ids).logits, adapted, atol=1e-5)
        assert torch.allclose(reloaded(ids).logits, adapted, atol=1e-5)
    merged = merge_lora(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters()) and not merged.config.tie_embeddings
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapted, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    hf_class = transformers.MambaForCausalLM if sizes["version"] == 1 else transformers.Mamba2ForCausalLM
    hf = hf_class.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, adapted, atol=1e-4)
