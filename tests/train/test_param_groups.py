"""Layer-wise learning-rate decay and weight decay: every parameter in exactly one group, at the rate and decay the
rule gives, written out here by hand for a 3-block model."""

import pytest
import torch

from medstate.ssm import MambaLM, SSMConfig
from medstate.train.param_groups import parameter_groups


def tiny(version):
    config = SSMConfig(version=version, vocab_size=64, d_model=16, n_layer=3, d_state=4, head_dim=8, chunk_size=8)
    return MambaLM(config)


def expected_rate(name, lr, gamma, embeddings_at_peak):
    if name.startswith("backbone.embeddings."):
        return lr if embeddings_at_peak else lr * gamma**3
    for block in range(3):
        if name.startswith(f"backbone.layers.{block}."):
            return lr * gamma ** (2 - block)
    assert name.startswith("backbone.norm_f.") or name.startswith("lm_head."), name
    return lr


def expected_decay(name, parameter):
    leaf = name.rsplit(".", 1)[-1]
    in_norm = ".norm" in name or name.startswith("backbone.norm_f")
    return 0.0 if parameter.ndim < 2 or leaf in ("A_log", "D", "bias") or in_norm else 0.1


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("embeddings_at_peak", [False, True])
def test_every_parameter_once_at_its_rate(version, embeddings_at_peak):
    model = tiny(version)
    groups = parameter_groups(model, lr=1e-3, weight_decay=0.1, layer_decay=0.9, embeddings_at_peak=embeddings_at_peak)
    seen = [id(p) for g in groups for p in g["params"]]
    assert len(seen) == len(set(seen))
    assert set(seen) == {id(p) for p in model.parameters()}  # the tied head is the embedding matrix: once
    names = dict(model.named_parameters())
    for group in groups:
        for name in group["names"]:
            assert group["lr"] == pytest.approx(expected_rate(name, 1e-3, 0.9, embeddings_at_peak)), name
            assert group["weight_decay"] == expected_decay(name, names[name]), name
    # the embeddings are the slowest parameters unless BioMamba's behaviour is asked for
    slowest = min(groups, key=lambda g: g["lr"])
    assert ("backbone.embeddings.weight" in slowest["names"]) != embeddings_at_peak


def test_without_layer_decay_one_rate_two_decays():
    model = tiny(2)
    groups = parameter_groups(model, lr=2e-3, weight_decay=0.05)
    assert {g["lr"] for g in groups} == {2e-3}
    assert sorted(g["weight_decay"] for g in groups) == [0.0, 0.05]


def test_optimizer_applies_the_group_rates():
    model = tiny(2)
    groups = parameter_groups(model, lr=1.0, weight_decay=0.0, layer_decay=0.5)
    optimizer = torch.optim.SGD(groups, lr=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    embeddings = model.backbone.embeddings.weight
    assert torch.allclose(before["backbone.embeddings.weight"] - embeddings, torch.full_like(embeddings, 0.125))
    top = model.backbone.layers[2].mixer.out_proj.weight
    assert torch.allclose(before["backbone.layers.2.mixer.out_proj.weight"] - top, torch.ones_like(top))
