"""EhrMamba model: packed batches equal separate samples, training signal flows, checkpoints round-trip."""

import numpy as np
import torch

from medstate.ehr.batching import collate, token_budget_batches
from medstate.ehr.model import EhrMamba, EhrMambaConfig


def sample(rng, length, vocab=50):
    return {
        "input_ids": rng.integers(1, vocab, length),
        "token_types": rng.integers(0, 9, length),
        "ages": rng.uniform(20, 80, length).astype(np.float32),
        "times": np.sort(rng.uniform(0, 2000, length)).astype(np.float32),
        "visit_segments": rng.integers(0, 3, length),
        "visit_orders": rng.integers(0, 20, length),
    }


def tiny(version=1):
    torch.manual_seed(0)
    return EhrMamba(
        EhrMambaConfig(vocab_size=50, d_model=32, n_layer=2, ssm_version=version, d_state=8, head_dim=8, dropout=0.0)
    ).eval()


def test_packed_batch_equals_each_sample_alone():
    rng = np.random.default_rng(0)
    samples = [sample(rng, n) for n in (7, 30, 13)]
    for version in (1, 2):
        model = tiny(version)
        packed = collate(samples, with_lm_targets=True)
        out = model(packed, packed["lm_targets"], packed["ends"])
        alone = [model(collate([s]), None, collate([s])["ends"]).class_logits for s in samples]
        torch.testing.assert_close(out.class_logits, torch.cat(alone), atol=1e-5, rtol=1e-5)
        offsets = np.cumsum([0, 7, 30])
        for s, offset in zip(samples, offsets):
            single = model(collate([s])).hidden_states
            part = out.hidden_states[:, offset : offset + len(s["input_ids"])]
            torch.testing.assert_close(part, single, atol=1e-5, rtol=1e-5)


def test_lm_targets_stop_at_sample_boundaries():
    rng = np.random.default_rng(1)
    batch = collate([sample(rng, 3), sample(rng, 2)], with_lm_targets=True)
    ids, targets = batch["input_ids"][0].tolist(), batch["lm_targets"][0].tolist()
    assert targets == [ids[1], ids[2], -100, ids[4], -100]
    assert batch["ends"].tolist() == [[0, 2], [0, 4]]
    assert batch["seq_idx"][0].tolist() == [0, 0, 0, 1, 1]


def test_token_budget_batches():
    assert token_budget_batches([5, 5, 5, 12, 1], 10) == [[0, 1], [2], [3], [4]]
    assert token_budget_batches([3, 3, 3], 10, order=np.array([2, 0, 1])) == [[2, 0, 1]]


def test_gradients_reach_every_embedding(tmp_path):
    rng = np.random.default_rng(2)
    model = tiny().train()
    batch = collate([sample(rng, 20), sample(rng, 9)], with_lm_targets=True)
    out = model(batch, batch["lm_targets"], batch["ends"])
    loss = out.lm_loss + torch.nn.functional.binary_cross_entropy_with_logits(
        out.class_logits, torch.tensor([1.0, 0.0])
    )
    loss.backward()
    for name in (
        "age.weight",
        "time.weight",
        "token_type.weight",
        "visit_order.weight",
        "visit_segment.weight",
        "project.weight",
    ):
        assert model.embeddings.get_parameter(name).grad.abs().sum() > 0, name
    assert model.lm.backbone.embeddings.weight.grad.abs().sum() > 0


def test_checkpoint_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    model = tiny(2)
    model.save_pretrained(tmp_path / "ckpt")
    again = EhrMamba.from_pretrained(tmp_path / "ckpt").eval()
    batch = collate([sample(rng, 11)])
    torch.testing.assert_close(
        model(batch, None, batch["ends"]).class_logits, again(batch, None, batch["ends"]).class_logits
    )
    assert again.embeddings.concept.weight is again.lm.backbone.embeddings.weight


def test_xgboost_count_features():
    from medstate.ehr.baselines.xgboost_counts import count_features
    from medstate.ehr.sequences import SPECIAL_TOKENS
    from medstate.ehr.store import Samples

    first = len(SPECIAL_TOKENS)
    arrays = {
        "input_ids": np.array([30, first, first + 1, first, 4, 30]),  # [TASK] a b a [VE] [TASK]
        "token_types": np.array([8, 4, 4, 4, 5, 8]),
        "ages": np.array([50.0, 50.5, 51.0, 52.0, 52.0, 52.0], dtype=np.float32),
    }
    features = count_features(Samples(frame=None, arrays=[arrays]), vocab_size=first + 2).toarray()[0]
    assert features[first] == 2 and features[first + 1] == 1 and features[:first].sum() == 0
    assert features[-2:].tolist() == [50.5, 52.0]  # age at the first and last event


def test_lstm_baseline_keeps_patients_apart(tmp_path):
    from medstate.ehr.baselines.lstm import EhrLSTM, EhrLSTMConfig

    torch.manual_seed(0)
    model = EhrLSTM(EhrLSTMConfig(vocab_size=50, d_model=16, hidden=8, dropout=0.0)).eval()
    rng = np.random.default_rng(4)
    samples = [sample(rng, n) for n in (5, 17, 9)]
    packed = collate(samples)
    together = model(packed, ends=packed["ends"]).class_logits
    alone = torch.cat([model(collate([s]), ends=collate([s])["ends"]).class_logits for s in samples])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=1e-5)
    model.save_pretrained(tmp_path / "lstm")
    again = EhrLSTM.from_pretrained(tmp_path / "lstm").eval()
    torch.testing.assert_close(again(packed, ends=packed["ends"]).class_logits, together)
    together.sum().backward()
    assert model.embeddings.age.weight.grad is not None


def test_lstm_reads_only_the_last_context_tokens():
    from medstate.ehr.baselines.lstm import EhrLSTM, EhrLSTMConfig

    torch.manual_seed(0)
    model = EhrLSTM(EhrLSTMConfig(vocab_size=50, d_model=16, hidden=8, dropout=0.0, context=6)).eval()
    rng = np.random.default_rng(5)
    long = sample(rng, 20)
    tail = {k: v[-6:] for k, v in long.items()}
    assert torch.allclose(model(collate([long]), ends=collate([long])["ends"]).class_logits,
                          model(collate([tail]), ends=collate([tail])["ends"]).class_logits)  # fmt: skip
