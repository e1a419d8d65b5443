"""PubMedQA: the official split, answer log-likelihoods against Hugging Face transformers' Mamba-2 on the same
weights, and the metrics against scikit-learn and published Wilson intervals."""

import numpy as np
import pytest
import torch

from medstate.eval.metrics import macro_f1, wilson_interval
from medstate.text.biomed.pubmedqa import LABELS, load_pubmedqa, majority_label, prompt_of, score_pubmedqa
from medstate.text.choices import choice_loglikelihoods

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def pubmedqa():
    from pathlib import Path

    return load_pubmedqa(Path(__file__).resolve().parents[3] / "data/demo/text/pubmedqa")


def test_official_split(pubmedqa):
    pool, test = pubmedqa
    assert len(pool) == len(test) == 500
    assert not {i.id for i in pool} & {i.id for i in test}
    assert [sum(i.label == label for i in test) for label in LABELS] == [276, 169, 55]  # SOURCE.md
    assert majority_label(pool) == "yes"


def test_answer_loglikelihoods_equal_transformers(pair, small_tokenizer, pubmedqa):
    hf, ours = pair
    items = pubmedqa[1][:5]
    prompts = [prompt_of(i)[-300:] for i in items]  # different lengths: the batch is left-padded
    choices = [" yes", " no", " maybe", " not sure"]  # several tokens for some
    got = choice_loglikelihoods(ours, small_tokenizer, prompts, choices, batch_size=3)
    for p, prompt in enumerate(prompts):
        context = [small_tokenizer.eos_id, *small_tokenizer.encode(prompt)]
        for c, choice in enumerate(choices):
            answer = small_tokenizer.encode(choice)
            ids = torch.tensor([context + answer])
            with torch.no_grad():
                log_probs = torch.log_softmax(hf(ids).logits[0].double(), -1)
            want = sum(float(log_probs[len(context) - 1 + k, t]) for k, t in enumerate(answer))
            assert got[p, c] == pytest.approx(want, abs=2e-4), (p, choice)
    assert any(len(small_tokenizer.encode(c)) > 1 for c in choices)


def test_metrics_against_references():
    from sklearn.metrics import f1_score

    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263 and 0/10
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    rng = np.random.default_rng(0)
    truth, predicted = rng.choice(LABELS, 200), rng.choice(["yes", "no"], 200)  # "maybe" never predicted
    assert macro_f1(truth, predicted, LABELS) == pytest.approx(
        f1_score(truth, predicted, labels=list(LABELS), average="macro", zero_division=0)
    )


def test_scores_and_majority_baseline(pair, small_tokenizer, pubmedqa):
    _, ours = pair
    pool, test = pubmedqa
    items = test[:40]
    result = score_pubmedqa(ours, small_tokenizer, items, majority_label(pool), max_prompt_tokens=128)
    chosen = np.array(LABELS)[result.loglikelihoods.argmax(1)]
    truth = np.array([i.label for i in items])
    assert result.metrics["accuracy"]["value"] == pytest.approx(np.mean(chosen == truth))
    binary = truth != "maybe"
    yes_no = np.array(LABELS)[result.loglikelihoods[:, :2].argmax(1)]
    assert result.metrics["yes_no_accuracy"]["value"] == pytest.approx(np.mean(yes_no[binary] == truth[binary]))
    assert result.majority["accuracy"]["value"] == pytest.approx(np.mean(truth == "yes"))
    full = score_pubmedqa(ours, small_tokenizer, test, "yes", max_prompt_tokens=8)
    assert full.majority["accuracy"]["value"] == 276 / 500
    low, high = full.majority["accuracy"]["low"], full.majority["accuracy"]["high"]
    assert low < 0.552 < high and high - low < 0.1
