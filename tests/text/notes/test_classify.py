"""Prompt-based classification: branched-state answer slots against each prompt read alone (values and gradients)
and against Hugging Face transformers on the same weights; independence of the question order; left truncation
that keeps the questions; thresholds from the tuning split only; multi-label metrics against scikit-learn."""

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from medstate.eval.multilabel import multilabel_metrics
from medstate.ssm import MambaLM, SSMConfig
from medstate.text.notes.classify import (
    Criterion,
    answer_ids,
    branched_slot_logits,
    criterion_scores,
    reencoded_slot_logits,
    slot_loss,
    tune_thresholds,
)
from medstate.text.tokenizer import padded_vocab_size, train_bpe

DOCUMENT = (
    "2150-01-01 -- Nursing note --\nthe patient was given aspirin for chest pain\n\n"
    "2150-01-03 -- Discharge summary note --\ndischarged home on day three with follow up"
)
CRITERIA = [
    Criterion("aspirin", "was the patient given aspirin"),
    Criterion("home", "discharged home"),
    Criterion("pain", "chest pain on day three with follow up and aspirin"),  # longer: the batch is right-padded
]


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE in which " yes" and " no" are single tokens (at most 300 ids, as the `pair` fixture's)."""
    texts = [DOCUMENT, *(c.question for c in CRITERIA)] * 5 + ["Answer: yes no no yes " * 50]
    return train_bpe(texts, vocab_size=300, min_frequency=1)


@pytest.fixture
def small_tokenizer(tokenizer):  # the `pair` fixture's vocabulary
    return tokenizer


@pytest.fixture
def model(tokenizer):
    torch.manual_seed(0)
    config = SSMConfig(version=2, vocab_size=padded_vocab_size(len(tokenizer)), d_model=32, n_layer=2,
                       d_state=8, head_dim=8, chunk_size=8)  # fmt: skip
    model = MambaLM(config)
    with torch.no_grad():  # random init barely lets early tokens matter: wider weights make the document count
        for name, p in model.named_parameters():
            if "A_log" not in name and "dt" not in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model.eval()


def test_branched_equals_each_prompt_alone_in_any_order(model, tokenizer):
    with torch.no_grad():
        branched = branched_slot_logits(model, tokenizer, DOCUMENT, CRITERIA)
        alone = reencoded_slot_logits(model, tokenizer, DOCUMENT, CRITERIA)
        torch.testing.assert_close(branched, alone, rtol=1e-4, atol=1e-4)
        reversed_order = branched_slot_logits(model, tokenizer, DOCUMENT, CRITERIA[::-1])
        torch.testing.assert_close(reversed_order.flip(0), branched, rtol=1e-5, atol=1e-5)
        # left truncation: the document loses its start, every question is read whole
        short = branched_slot_logits(model, tokenizer, DOCUMENT, CRITERIA, max_document_tokens=10)
        ids = tokenizer.encode(DOCUMENT)[-10:]
        cut = tokenizer.decode(ids)
        assert tokenizer.encode(cut) == ids
        alone_cut = reencoded_slot_logits(model, tokenizer, cut, CRITERIA, max_document_tokens=10)
        torch.testing.assert_close(short, alone_cut, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(short, branched, atol=1e-2)  # the cut changed what was read
    scores = criterion_scores(model, tokenizer, [DOCUMENT], CRITERIA)
    yes, no = answer_ids(tokenizer)
    np.testing.assert_allclose(scores[0], (alone[:, yes] - alone[:, no]).numpy(), rtol=1e-4, atol=1e-4)


def test_branched_training_gradients_equal_each_prompt_alone(model, tokenizer):
    labels = [True, False, True]
    model.train()
    slot_loss(model, tokenizer, DOCUMENT, CRITERIA, labels).backward()
    branched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    yes, no = answer_ids(tokenizer)
    logits = reencoded_slot_logits(model, tokenizer, DOCUMENT, CRITERIA)
    targets = torch.tensor([yes if label else no for label in labels])
    torch.nn.functional.cross_entropy(logits, targets).backward()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(branched[name], parameter.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_answer_slots_equal_transformers(pair, tokenizer):
    hf, ours = pair
    with torch.no_grad():
        got = branched_slot_logits(ours, tokenizer, DOCUMENT, CRITERIA)
        for row, criterion in enumerate(CRITERIA):
            prompt = DOCUMENT + f"\n\nQuestion: {criterion.question}\nAnswer:"
            ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(prompt)]])
            torch.testing.assert_close(got[row], hf(ids).logits[0, -1].float(), rtol=1e-4, atol=2e-4)


def test_thresholds_come_from_the_tuning_split():
    rng = np.random.default_rng(0)
    tuning_y = rng.random((40, 3)) < 0.4
    tuning_s = tuning_y * 1.0 + rng.normal(0, 0.8, tuning_y.shape)
    thresholds = tune_thresholds(tuning_y, tuning_s)
    for k in range(3):  # brute force, written here from the definition
        candidates = np.unique(tuning_s[:, k])
        best = max(candidates, key=lambda t, k=k: (f1_score(tuning_y[:, k], tuning_s[:, k] >= t), -t))
        assert f1_score(tuning_y[:, k], tuning_s[:, k] >= thresholds.per_label[k]) == pytest.approx(
            f1_score(tuning_y[:, k], tuning_s[:, k] >= best)
        )
    micro = [f1_score(tuning_y.ravel(), tuning_s.ravel() >= t) for t in np.unique(tuning_s)]
    assert f1_score(tuning_y.ravel(), tuning_s.ravel() >= thresholds.global_) == pytest.approx(max(micro))
    # a test split scored 5 higher: thresholds chosen on it would differ; the tuning ones must not move
    test_y = rng.random((40, 3)) < 0.4
    test_s = test_y * 1.0 + rng.normal(0, 0.8, test_y.shape) + 5
    assert tune_thresholds(tuning_y, tuning_s) == thresholds != tune_thresholds(test_y, test_s)


def test_multilabel_metrics_against_scikit_learn():
    rng = np.random.default_rng(1)
    y = rng.random((60, 4)) < 0.3
    y[:, 3] = False  # a label without positives: left out of the macro means where undefined
    s = y * 1.5 + rng.normal(0, 1, y.shape)
    thresholds = [0.5, 0.7, 0.2, 0.9]
    got = multilabel_metrics(y, s, thresholds, subjects=np.arange(60) // 2, n_bootstrap=200)
    predicted = s >= np.array(thresholds)
    assert got["micro_f1"].value == pytest.approx(f1_score(y, predicted, average="micro"))
    assert got["micro_precision"].value == pytest.approx(precision_score(y, predicted, average="micro"))
    assert got["micro_recall"].value == pytest.approx(recall_score(y, predicted, average="micro"))
    # macro F1 over the labels with a positive or a prediction: label 3 has no positives, its false alarms count as 0
    defined = [k for k in range(4) if y[:, k].any() or predicted[:, k].any()]
    assert 3 in defined and predicted[:, 3].any()
    expected_macro = np.mean([f1_score(y[:, k], predicted[:, k], zero_division=0) for k in defined])
    assert got["macro_f1"].value == pytest.approx(expected_macro)
    assert got["micro_auroc"].value == pytest.approx(roc_auc_score(y.ravel(), s.ravel()))
    assert got["macro_auroc"].value == pytest.approx(np.mean([roc_auc_score(y[:, k], s[:, k]) for k in range(3)]))
    top = np.argsort(-s, axis=1)[:, :1]
    hits = y[np.arange(60), top[:, 0]].sum()
    assert got["precision_at_1"].value == pytest.approx(hits / 60)
    assert got["recall_at_1"].value == pytest.approx(hits / y.sum())
    assert got["micro_f1"].low <= got["micro_f1"].value <= got["micro_f1"].high


def test_classification_run_tunes_on_tuning_and_scores_test_once(model, tokenizer, tmp_path):
    import json

    import yaml

    from medstate.text.notes.classify_run import ClassifyConfig, run_baseline, run_classification
    from medstate.train.loop import TrainConfig

    model.save_pretrained(tmp_path / "init")
    tokenizer.save(tmp_path / "init")
    (tmp_path / "criteria.yaml").write_text(yaml.safe_dump({"criteria": [
        {"name": c.name, "question": c.question} for c in CRITERIA]}))  # fmt: skip
    rng = np.random.default_rng(0)
    sentences = DOCUMENT.split("\n")
    with open(tmp_path / "data.jsonl", "w") as handle:
        for i in range(24):
            split = "train" if i < 12 else "tuning" if i < 18 else "test"
            labels = {c.name: bool(rng.random() < 0.5) for c in CRITERIA}
            text = "\n".join(rng.choice(sentences, 3))
            handle.write(
                json.dumps({"id": i, "subject": f"s{i // 2}", "split": split, "text": text, "labels": labels}) + "\n"
            )
    train = TrainConfig(max_steps=6, lr=1e-3, warmup_steps=0, eval_every=3, save_every=3)
    config = ClassifyConfig(init=str(tmp_path / "init"), criteria=str(tmp_path / "criteria.yaml"),
                            data=str(tmp_path / "data.jsonl"), bootstrap=50, train=train)  # fmt: skip
    metrics = run_classification(config, tmp_path / "run")
    assert metrics["documents"] == {"train": 12, "tuning": 6, "test": 6}
    check_thresholds_from_tuning(metrics, tmp_path / "run")
    assert (tmp_path / "run" / "report.md").read_text().startswith("# Prompt-based classification")
    # the TF-IDF baseline goes through the same thresholds and metrics
    for kind in ("tfidf", "pooled"):
        baseline = run_baseline(config, tmp_path / kind, kind)
        assert baseline["documents"] == metrics["documents"]
        check_thresholds_from_tuning(baseline, tmp_path / kind)


def check_thresholds_from_tuning(metrics, run_dir):
    import polars as pl

    predictions = pl.read_parquet(run_dir / "predictions.parquet")
    names = [c.name for c in CRITERIA]

    def matrix(split, column):
        frame = predictions.filter(pl.col("split") == split).pivot("criterion", index="id", values=column)
        return frame.select(names).to_numpy()

    # the written thresholds are those of the tuning split's scores, recomputed here
    expected = tune_thresholds(matrix("tuning", "label").astype(bool), matrix("tuning", "score"))
    assert metrics["thresholds"]["per_label"] == dict(zip(names, expected.per_label))
    assert metrics["thresholds"]["global"] == expected.global_
    # and the test metrics apply them to the test split
    y, s = matrix("test", "label").astype(bool), matrix("test", "score")
    predicted = s >= np.array(expected.per_label)
    assert metrics["test_per_label_thresholds"]["micro_f1"]["value"] == pytest.approx(
        f1_score(y, predicted, average="micro", zero_division=0)
    )


def test_pooled_states_are_the_mean_final_hidden_state(model, tokenizer, tmp_path):
    from medstate.text.notes.classify_run import ClassifyConfig, _pooled_states

    model.save_pretrained(tmp_path / "init")
    tokenizer.save(tmp_path / "init")
    config = ClassifyConfig(init=str(tmp_path / "init"), criteria="", data="", max_document_tokens=20)
    texts = [DOCUMENT, "discharged home"]
    got = _pooled_states(config, texts)
    for row, text in enumerate(texts):
        ids = torch.tensor([[tokenizer.eos_id, *tokenizer.encode(text)][-20:]])
        with torch.no_grad():
            hidden = model(ids).hidden_states[0]
        np.testing.assert_allclose(got[row], hidden.mean(0).double().numpy(), rtol=1e-4, atol=1e-5)
