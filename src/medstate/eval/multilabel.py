"""Multi-label metrics (criteria, codes): micro and macro precision / recall / F1 at given thresholds, P/R/F1 at k
(each document's k highest-scored labels), micro and macro AUROC, each with a 95% bootstrap interval over subjects.

    micro: pool every (document, label) decision, then P = TP / (TP + FP), R = TP / (TP + FN), F1 = 2TP / (2TP+FP+FN)
    macro: the mean over labels of each label's metric, over the labels where it is defined (precision: some
           predicted; recall: some positive; F1: some predicted or positive, so a label with no positives but false
           alarms counts as 0)
    at k:  predicted = the k top-scored labels of each document; P@k = TP / (k · documents), R@k = TP / positives
    AUROC: micro on the pooled pairs; macro the mean over labels with both classes present
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from medstate.eval.metrics import MetricResult, auroc, bootstrap_metrics


def _counts(y: np.ndarray, predicted: np.ndarray, axis=None):
    tp = (predicted & y).sum(axis=axis)
    return tp, (predicted & ~y).sum(axis=axis), (~predicted & y).sum(axis=axis)


def _ratio(a, b):
    return float(a / b) if b else None


def _macro(values: Sequence[float | None]) -> float | None:
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None


def _decisions(thresholds: np.ndarray) -> Callable[[np.ndarray, np.ndarray], dict[str, float | None]]:
    def metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float | None]:
        predicted = s >= thresholds
        tp, fp, fn = _counts(y, predicted)
        per_tp, per_fp, per_fn = _counts(y, predicted, axis=0)
        return {
            "micro_precision": _ratio(tp, tp + fp),
            "micro_recall": _ratio(tp, tp + fn),
            "micro_f1": _ratio(2 * tp, 2 * tp + fp + fn),
            "macro_precision": _macro([_ratio(a, a + b) for a, b in zip(per_tp, per_fp)]),
            "macro_recall": _macro([_ratio(a, a + c) for a, c in zip(per_tp, per_fn)]),
            "macro_f1": _macro([_ratio(2 * a, 2 * a + b + c) for a, b, c in zip(per_tp, per_fp, per_fn)]),
        }

    return metrics


def _at_k(k: int) -> Callable[[np.ndarray, np.ndarray], dict[str, float | None]]:
    def metrics(y: np.ndarray, s: np.ndarray) -> dict[str, float | None]:
        top = np.argsort(-s, axis=1, kind="stable")[:, :k]
        predicted = np.zeros_like(y)
        np.put_along_axis(predicted, top, True, axis=1)
        tp = int((predicted & y).sum())
        precision, recall = _ratio(tp, predicted.sum()), _ratio(tp, y.sum())
        f1 = (
            2 * precision * recall / (precision + recall)
            if precision and recall
            else (0.0 if recall is not None else None)
        )
        return {f"precision_at_{k}": precision, f"recall_at_{k}": recall, f"f1_at_{k}": f1}

    return metrics


def _aurocs(y: np.ndarray, s: np.ndarray) -> dict[str, float | None]:
    return {
        "micro_auroc": auroc(y.ravel(), s.ravel()),
        "macro_auroc": _macro([auroc(y[:, k], s[:, k]) for k in range(y.shape[1])]),
    }


def multilabel_metrics(
    labels: np.ndarray,
    scores: np.ndarray,
    thresholds: float | Sequence[float],
    subjects: Sequence | None = None,
    k: Sequence[int] = (1, 3),
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, MetricResult]:
    """labels and scores [documents, labels]; predicted positive where score >= threshold (one for all labels, or
    one per label). Intervals resample subjects (all of a subject's documents together)."""
    y, s = np.asarray(labels, dtype=bool), np.asarray(scores, dtype=float)
    subjects = np.arange(len(y)) if subjects is None else np.asarray(subjects)
    groups = [_decisions(np.broadcast_to(np.asarray(thresholds, dtype=float), (y.shape[1],))), _aurocs]
    groups += [_at_k(value) for value in k if value <= y.shape[1]]
    out: dict[str, MetricResult] = {}
    for group in groups:
        out.update(bootstrap_metrics(group, y, s, subjects, n_bootstrap, seed))
    return out
