"""Transformer baselines (BERT-style and BigBird): patients stay apart in packed batches, BigBird stays block-sparse,
BERT's masking follows its recipe, checkpoints round-trip."""

import numpy as np
import pytest
import torch

from medstate.ehr.baselines.transformer import MASK_ID, EhrTransformer, EhrTransformerConfig, mlm_corrupt
from medstate.ehr.batching import collate
from medstate.ehr.sequences import SPECIAL_TOKENS, TYPE_EVENT
from medstate.ehr.training import load_model
from tests.ehr.test_model import sample


def tiny(architecture: str, context: int = 256) -> EhrTransformer:
    torch.manual_seed(0)
    config = EhrTransformerConfig(
        vocab_size=50, architecture=architecture, d_model=16, n_layer=2, n_head=2, context=context, block_size=8,
        num_random_blocks=1, dropout=0.0,
    )  # fmt: skip
    return EhrTransformer(config).eval()


@pytest.mark.parametrize("architecture", ["bert", "bigbird"])
def test_packed_batch_equals_each_sample_alone(architecture):
    model = tiny(architecture)
    rng = np.random.default_rng(0)
    # BigBird: block-sparse above 56 tokens, full attention below. Its block-sparse output depends on how far a
    # sample is padded (the last block is global), so the long samples here are whole blocks of equal length.
    samples = [sample(rng, n) for n in (96, 20, 96, 25)]
    together = collate(samples)
    packed = model(together, ends=together["ends"]).class_logits
    alone = torch.cat([model(collate([s]), ends=collate([s])["ends"]).class_logits for s in samples])
    assert packed.shape == (4,)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


def test_window_is_the_last_context_tokens():
    model = tiny("bert", context=32)
    rng = np.random.default_rng(1)
    long = sample(rng, 100)
    tail = {name: values[-32:] for name, values in long.items()}
    logit_long = model(collate([long]), ends=collate([long])["ends"]).class_logits
    logit_tail = model(collate([tail]), ends=collate([tail])["ends"]).class_logits
    torch.testing.assert_close(logit_long, logit_tail)


def test_bigbird_stays_block_sparse_after_a_short_input():
    model = tiny("bigbird")
    rng = np.random.default_rng(2)
    short, long = collate([sample(rng, 20)]), collate([sample(rng, 200)])
    model(short, ends=short["ends"])
    assert model.encoder.attention_type == "original_full"  # below BigBird's minimum for sparse attention
    model(long, ends=long["ends"])
    assert model.encoder.attention_type == "block_sparse"


def test_masking_recipe():
    torch.manual_seed(0)
    n = 200_000
    types = torch.where(torch.rand(1, n) < 0.7, TYPE_EVENT, 3)
    ids = torch.randint(len(SPECIAL_TOKENS), 1000, (1, n))
    corrupted, targets = mlm_corrupt(ids, types, 0.15, 1000)
    picked = targets != -100
    assert not picked[types != TYPE_EVENT].any()  # only events are masked
    assert picked[types == TYPE_EVENT].float().mean().item() == pytest.approx(0.15, abs=0.005)
    assert torch.equal(targets[picked], ids[picked])
    assert torch.equal(corrupted[~picked], ids[~picked])
    masked = (corrupted[picked] == MASK_ID).float().mean().item()
    kept = (corrupted[picked] == ids[picked]).float().mean().item()
    assert masked == pytest.approx(0.8, abs=0.01)
    assert kept == pytest.approx(0.1, abs=0.01)  # plus the rare random draw of the same code
    assert (corrupted[picked] >= len(SPECIAL_TOKENS)).sum() + (corrupted[picked] == MASK_ID).sum() == picked.sum()


@pytest.mark.parametrize("architecture", ["bert", "bigbird"])
def test_mlm_loss_learns_and_checkpoint_round_trips(architecture, tmp_path):
    model = tiny(architecture).train()
    rng = np.random.default_rng(3)
    samples = [sample(rng, n) for n in (150, 60, 90)]
    for s in samples:
        s["token_types"][:] = TYPE_EVENT
        s["input_ids"] = np.arange(len(s["input_ids"])) % 10 + len(SPECIAL_TOKENS)  # a learnable pattern
    batch = collate(samples)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        loss = model.pretraining_loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])
    model.eval().save_pretrained(tmp_path / "ckpt")
    again = load_model(tmp_path / "ckpt").eval()
    assert isinstance(again, EhrTransformer) and again.config == model.config
    torch.testing.assert_close(
        again(batch, ends=batch["ends"]).class_logits, model(batch, ends=batch["ends"]).class_logits
    )
