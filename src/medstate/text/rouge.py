"""ROUGE-1/2/L/Lsum F-measures (×100) with Google's `rouge-score` in one fixed configuration: Porter stemming on,
its default tokenizer (lower-cased runs of letters and digits), and for ROUGE-Lsum sentences taken as the lines of
the text (clinical notes are written a statement per line; `rouge-score` would otherwise need NLTK's punkt
models, which cannot be downloaded here). The figure is the mean over documents, with a seeded 95% bootstrap
interval over documents."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medstate.errors import MedstateError
from medstate.eval.metrics import MetricResult

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_per_document(predictions: Sequence[str], references: Sequence[str]) -> dict[str, np.ndarray]:
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise MedstateError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True, split_summaries=False)
    scores = [scorer.score(reference, prediction) for prediction, reference in zip(predictions, references)]
    return {kind: np.array([100 * s[kind].fmeasure for s in scores]) for kind in ROUGE_TYPES}


def rouge(
    predictions: Sequence[str], references: Sequence[str], n_bootstrap: int = 1000, seed: int = 0
) -> dict[str, MetricResult]:
    per_document = rouge_per_document(predictions, references)
    if not len(predictions):
        raise MedstateError("ROUGE needs at least one prediction")
    chosen = np.random.default_rng(seed).integers(0, len(predictions), size=(n_bootstrap, len(predictions)))
    out = {}
    for kind, values in per_document.items():
        low, high = np.percentile(values[chosen].mean(1), [2.5, 97.5])
        out[kind] = MetricResult(float(values.mean()), float(low), float(high), "ok", n_bootstrap)
    return out


def paired_rouge_difference(
    predictions_a: Sequence[str],
    predictions_b: Sequence[str],
    references: Sequence[str],
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, dict]:
    """System A minus system B on the same documents: the mean per-document difference of each ROUGE F (×100) with
    a seeded 95% paired bootstrap interval (the same resampled documents for both systems), and the share of
    resamples where A is not better (a one-sided bootstrap p-value for "A beats B")."""
    a = rouge_per_document(predictions_a, references)
    b = rouge_per_document(predictions_b, references)
    chosen = np.random.default_rng(seed).integers(0, len(references), size=(n_bootstrap, len(references)))
    out = {}
    for kind in ROUGE_TYPES:
        difference = a[kind] - b[kind]
        resampled = difference[chosen].mean(1)
        low, high = np.percentile(resampled, [2.5, 97.5])
        out[kind] = {"difference": float(difference.mean()), "low": float(low), "high": float(high),
                     "p_not_better": float((resampled <= 0).mean())}  # fmt: skip
    return out
