"""Layer pruning: a pruned checkpoint is an ordinary one (HF transformers loads it with the logits of HF's own model
with those blocks removed), its state steps equal its forward, and the block-influence criterion is recomputed
here block by block."""

import pytest
import torch
from torch import nn

from medstate import MedstateError
from medstate.ssm import MambaLM, SSMConfig, load_pretrained
from medstate.ssm.prune import block_influence, keep_indices, least_influential, prune_layers

SIZES = {
    1: dict(version=1, vocab_size=40, d_model=16, n_layer=5, d_state=4, expand=2),
    2: dict(version=2, vocab_size=40, d_model=16, n_layer=5, d_state=8, head_dim=8, chunk_size=8),
}


def test_layer_specifications():
    assert keep_indices("0,1,2,4", 6) == [0, 1, 2, 4]
    assert keep_indices("first:2", 6) == [0, 1] and keep_indices("last:2", 6) == [4, 5]
    assert keep_indices("every-other", 6) == [0, 2, 4, 5] and keep_indices("every-other", 5) == [0, 2, 4]
    assert keep_indices("drop:1,3", 5) == [0, 2, 4]
    for bad in ("2,1", "0,0", "0,6", "drop:9", "first:0", "some"):
        with pytest.raises(MedstateError):
            keep_indices(bad, 6)
    assert least_influential([0.5, 0.1, 0.3, 0.1, 0.9], 2) == [0, 2, 4]  # the two 0.1s go
    with pytest.raises(MedstateError):
        least_influential([0.5, 0.1], 2)


@pytest.mark.parametrize("version", [1, 2])
def test_pruned_checkpoint_is_hf_without_those_blocks(version, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    MambaLM(SSMConfig(**SIZES[version])).save_pretrained(tmp_path / "full")
    keep = [0, 2, 3]
    pruned = prune_layers(load_pretrained(tmp_path / "full"), keep)
    pruned.save_pretrained(tmp_path / "pruned")
    hf_class = transformers.MambaForCausalLM if version == 1 else transformers.Mamba2ForCausalLM
    reference = hf_class.from_pretrained(tmp_path / "full").eval()  # HF's model, blocks removed by hand
    reference.backbone.layers = nn.ModuleList(reference.backbone.layers[i] for i in keep)
    for i, layer in enumerate(reference.backbone.layers):
        layer.layer_idx = layer.mixer.layer_idx = i
    loaded = hf_class.from_pretrained(tmp_path / "pruned").eval()
    ids = torch.randint(0, 40, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        assert loaded.config.num_hidden_layers == 3
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-4)
        assert torch.allclose(load_pretrained(tmp_path / "pruned")(ids).logits, expected, atol=1e-4)
        # the recurrent state has one entry per kept block; stepping through it gives the forward's logits
        state, stepped = pruned.empty_state(2), []
        assert len(state.ssm) == 3
        for t in range(ids.shape[1]):
            out = pruned.step(ids[:, t], state)
            stepped.append(out.logits)
            state = out.state
        assert torch.allclose(torch.stack(stepped, 1), expected, atol=1e-4)


def test_block_influence_is_one_minus_cosine_per_block():
    torch.manual_seed(0)
    model = MambaLM(SSMConfig(**SIZES[2])).eval()
    batches = [torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    influence = block_influence(model, batches)
    expected, count = torch.zeros(5, dtype=torch.float64), 0
    with torch.no_grad():
        for ids in batches:
            hidden = model.backbone.embeddings(ids)
            for i, layer in enumerate(model.backbone.layers):
                out, _ = layer(hidden)
                cos = (hidden * out).sum(-1) / (hidden.norm(dim=-1) * out.norm(dim=-1))
                expected[i] += (1 - cos).double().sum()
                hidden = out
            count += ids.numel()
    assert influence == pytest.approx((expected / count).numpy(), rel=1e-5)
    assert least_influential(influence, 2) == sorted(sorted(range(5), key=lambda i: influence[i])[2:])
