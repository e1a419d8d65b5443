"""PubMedQA (PQA-L): 1,000 expert-labelled yes/no/maybe questions on PubMed abstracts, scored on the official
500-item test split (`test_ground_truth.json`); the other 500 items are the pool for training and tuning. Never tuned
on the test split.

A model answers by the log-likelihood of " yes", " no" and " maybe" after the prompt (zero-shot, or after SFT on
the same prompt format). Reported: 3-class accuracy and macro-F1, and yes/no accuracy (items labelled yes or no,
choosing between yes and no only: BioMamba's "binary accuracy"), accuracy with Wilson 95% intervals, macro-F1 with
a bootstrap interval over items, and beside them the majority baseline (the training pool's most frequent label).
"""

from __future__ import annotations

import gzip
import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medstate.errors import MedstateError
from medstate.eval.metrics import bootstrap, macro_f1, wilson_interval
from medstate.text.choices import choice_loglikelihoods
from medstate.text.tokenizer import TextTokenizer

LABELS = ("yes", "no", "maybe")


@dataclass(frozen=True)
class QAItem:
    id: str  # the PMID
    question: str
    contexts: tuple[str, ...]
    long_answer: str
    label: str


def prompt_of(item: QAItem) -> str:
    """Context first, so that cutting a long prompt from the left keeps the question."""
    return f"Context: {' '.join(item.contexts)}\nQuestion: {item.question}\nAnswer:"


def answer_of(item: QAItem) -> str:
    """The SFT target: the decision, then the abstract's conclusion."""
    return f" {item.label}. {item.long_answer}"


def load_pubmedqa(directory: str | Path) -> tuple[list[QAItem], list[QAItem]]:
    """(training pool, official test split) from a folder holding `ori_pqal.json(.gz)` and `test_ground_truth.json`."""
    directory = Path(directory)
    source = next((p for p in (directory / "ori_pqal.json.gz", directory / "ori_pqal.json") if p.is_file()), None)
    truth_file = directory / "test_ground_truth.json"
    if source is None or not truth_file.is_file():
        raise MedstateError(f"{directory}: needs ori_pqal.json(.gz) and test_ground_truth.json (PubMedQA PQA-L)")
    opener = gzip.open if source.suffix == ".gz" else open
    with opener(source, "rt", encoding="utf-8") as handle:
        records = json.load(handle)
    truth = json.loads(truth_file.read_text())
    items = {}
    for pmid, record in records.items():
        try:
            items[pmid] = QAItem(
                pmid, record["QUESTION"], tuple(record["CONTEXTS"]), record["LONG_ANSWER"], record["final_decision"]
            )
        except KeyError as err:
            raise MedstateError(f"{source}: item {pmid} has no {err.args[0]}") from None
    missing = [pmid for pmid in truth if pmid not in items]
    if missing:
        raise MedstateError(f"{truth_file}: {len(missing)} test PMIDs are not in {source.name} (e.g. {missing[0]})")
    for pmid, label in truth.items():
        if items[pmid].label != label:
            raise MedstateError(f"{truth_file}: PMID {pmid} is {label!r} there, {items[pmid].label!r} in {source.name}")
    test = [items[pmid] for pmid in truth]
    pool = [item for pmid, item in items.items() if pmid not in truth]
    return pool, test


def _accuracy(correct: np.ndarray) -> dict:
    low, high = wilson_interval(int(correct.sum()), len(correct))
    return {"value": float(correct.mean()), "low": low, "high": high, "n": len(correct)}


def _macro_f1(truth: np.ndarray, predicted: np.ndarray, labels: Sequence[str], ids: np.ndarray) -> dict:
    def metric(y, p):
        return macro_f1(y, p, labels)

    result = bootstrap(metric, truth, predicted, ids)
    return {"value": result.value, "low": result.low, "high": result.high, "n": len(truth)}


def qa_metrics(truth: Sequence[str], predicted: Sequence[str], binary_predicted: Sequence[str], ids: Sequence[str]):
    truth, predicted, binary_predicted, ids = map(np.asarray, (truth, predicted, binary_predicted, ids))
    binary = truth != "maybe"
    return {
        "accuracy": _accuracy(truth == predicted),
        "macro_f1": _macro_f1(truth, predicted, LABELS, ids),
        "yes_no_accuracy": _accuracy(truth[binary] == binary_predicted[binary]),
    }


@dataclass
class QAResult:
    ids: list[str]
    labels: list[str]
    predictions: list[str]
    loglikelihoods: np.ndarray  # [items, 3] for yes, no, maybe
    metrics: dict
    majority: dict

    def to_dict(self) -> dict:
        return {"items": len(self.ids), "model": self.metrics, "majority_baseline": self.majority}


@torch.no_grad()
def score_pubmedqa(
    model: torch.nn.Module,
    tokenizer: TextTokenizer,
    items: Sequence[QAItem],
    majority_label: str,
    batch_size: int = 8,
    max_prompt_tokens: int | None = 1024,
) -> QAResult:
    """Answer every item by the likeliest choice; metrics for the model and for always answering `majority_label`."""
    prompts, choices = [prompt_of(i) for i in items], [f" {label}" for label in LABELS]
    scores = choice_loglikelihoods(model, tokenizer, prompts, choices, batch_size, max_prompt_tokens)
    predicted = [LABELS[k] for k in scores.argmax(1)]
    binary = [LABELS[k] for k in scores[:, :2].argmax(1)]
    ids, truth = [i.id for i in items], [i.label for i in items]
    majority = [majority_label] * len(items)
    majority_binary = [majority_label if majority_label != "maybe" else "yes"] * len(items)
    return QAResult(
        ids,
        truth,
        predicted,
        scores,
        qa_metrics(truth, predicted, binary, ids),
        {"label": majority_label, **qa_metrics(truth, majority, majority_binary, ids)},
    )


def majority_label(items: Sequence[QAItem]) -> str:
    return Counter(i.label for i in items).most_common(1)[0][0]
