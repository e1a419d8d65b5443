"""Classification metrics from probabilities, with subject-level bootstrap confidence intervals.

Every metric takes the true 0/1 labels and the predicted probability (never a hard label, except F1, which is
taken at a threshold chosen on the tuning split). A metric that is undefined for the data (AUROC with one class
only, AUPRC without positives) is None with the reason in `status`, never NaN and never a crash.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

N_BOOTSTRAP = 1000


def _check(y_true, y_score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.int64)
    s = np.asarray(y_score, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"y_true and y_score must be 1-d and of the same length, got {y.shape} and {s.shape}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be 0/1")
    return y, s


def auroc(y_true, y_score) -> float | None:
    """Area under the ROC curve: the probability that a random positive scores above a random negative (ties
    count half), from average ranks (Mann-Whitney U)."""
    y, s = _check(y_true, y_score)
    positives, negatives = int(y.sum()), int(len(y) - y.sum())
    if positives == 0 or negatives == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    # average rank of each group of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_scores)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[y == 1].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def average_precision(y_true, y_score) -> float | None:
    """Area under the precision-recall curve as the step sum Σ (R_k − R_{k−1}) P_k over distinct thresholds,
    from the highest score down (the definition scikit-learn uses)."""
    y, s = _check(y_true, y_score)
    if y.sum() == 0:
        return None
    order = np.argsort(-s, kind="mergesort")
    y_sorted, s_sorted = y[order], s[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s_sorted)), len(s) - 1]
    true_positives = np.cumsum(y_sorted)[last_of_tie]
    predicted = last_of_tie + 1
    precision = true_positives / predicted
    recall = true_positives / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_at(y_true, y_score, threshold: float) -> float | None:
    """F1 of `score >= threshold`; undefined (None) without positives, where recall is undefined."""
    y, s = _check(y_true, y_score)
    if y.sum() == 0:
        return None
    predicted = s >= threshold
    tp = int((predicted & (y == 1)).sum())
    fp = int((predicted & (y == 0)).sum())
    fn = int((~predicted & (y == 1)).sum())
    return 2 * tp / (2 * tp + fp + fn)


def best_f1_threshold(y_true, y_score) -> float | None:
    """The score threshold that maximises F1 (to be chosen on the tuning split, then applied to the test split)."""
    y, s = _check(y_true, y_score)
    if y.sum() == 0:
        return None
    candidates = np.unique(s)
    f1 = [f1_at(y, s, t) or 0.0 for t in candidates]
    return float(candidates[int(np.argmax(f1))])


def expected_calibration_error(y_true, y_score, bins: int = 10) -> float | None:
    """Σ_b (n_b / n) |mean(y in b) − mean(score in b)| over equal-width probability bins."""
    y, s = _check(y_true, y_score)
    if len(y) == 0:
        return None
    index = np.clip((s * bins).astype(int), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            total += inside.mean() * abs(y[inside].mean() - s[inside].mean())
    return float(total)


def reliability_curve(y_true, y_score, bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean score, observed frequency, count) per non-empty equal-width bin."""
    y, s = _check(y_true, y_score)
    index = np.clip((s * bins).astype(int), 0, bins - 1)
    rows = [
        (s[index == b].mean(), y[index == b].mean(), int((index == b).sum())) for b in range(bins) if (index == b).any()
    ]
    return tuple(np.asarray(column) for column in zip(*rows)) if rows else (np.array([]),) * 3


@dataclass
class MetricResult:
    value: float | None
    low: float | None = None  # 95% bootstrap interval
    high: float | None = None
    status: str = "ok"
    resamples: int = 0  # bootstrap resamples in which the metric was defined


def format_interval(entry: dict, scale: float = 1.0, digits: int = 3, undefined: str | None = None) -> str:
    """A `MetricResult` (or its dict) as `value [low, high]`, scaled (×100 for percentages); without an interval,
    the value alone; without a value, `undefined` if given, else its status."""
    if entry.get("value") is None:
        return undefined if undefined is not None else entry.get("status") or "undefined"
    value = entry["value"] * scale
    if entry.get("low") is None:
        return f"{value:.{digits}f}"
    return f"{value:.{digits}f} [{entry['low'] * scale:.{digits}f}, {entry['high'] * scale:.{digits}f}]"


@dataclass
class TaskMetrics:
    n: int
    positives: int
    auroc: MetricResult
    auprc: MetricResult
    f1: MetricResult
    threshold: float | None
    ece: float | None
    extra: dict = field(default_factory=dict)


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95% by default): unlike the normal approximation it stays inside
    [0, 1] and keeps its coverage near 0 and 1 and for small n."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


def macro_f1(y_true, y_pred, labels) -> float:
    """The unweighted mean over `labels` of each label's F1 (0 for a label never predicted nor present)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    scores = []
    for label in labels:
        tp = np.sum((y_pred == label) & (y_true == label))
        predicted, actual = np.sum(y_pred == label), np.sum(y_true == label)
        scores.append(0.0 if predicted + actual == 0 else 2 * tp / (predicted + actual))
    return float(np.mean(scores))


def bootstrap(metric, y, s, subjects, n: int = N_BOOTSTRAP, seed: int = 0) -> MetricResult:
    """The metric with a 95% percentile interval from resampling *subjects* (all of a subject's samples together),
    so that patients with many samples do not narrow the interval."""
    return bootstrap_metrics(lambda a, b: {"metric": metric(a, b)}, y, s, subjects, n, seed)["metric"]


def bootstrap_metrics(metrics, y, s, subjects, n: int = N_BOOTSTRAP, seed: int = 0) -> dict[str, MetricResult]:
    """`bootstrap` for a function returning several metrics by name, computed once per resample."""
    values = metrics(y, s)
    unique, inverse = np.unique(subjects, return_inverse=True)
    members = [np.flatnonzero(inverse == i) for i in range(len(unique))]
    rng = np.random.default_rng(seed)
    resampled: dict[str, list[float]] = {name: [] for name, value in values.items() if value is not None}
    for _ in range(n if resampled else 0):
        chosen = np.concatenate([members[i] for i in rng.integers(0, len(unique), len(unique))])
        for name, value in metrics(y[chosen], s[chosen]).items():
            if value is not None and name in resampled:
                resampled[name].append(value)
    out = {}
    for name, value in values.items():
        if value is None:
            out[name] = MetricResult(
                None, status="undefined: " + ("no positives" if y.sum() == 0 else "one class only")
            )
        elif not resampled[name]:
            out[name] = MetricResult(value, status="no bootstrap resample defined the metric")
        else:
            low, high = np.percentile(resampled[name], [2.5, 97.5])
            out[name] = MetricResult(value, float(low), float(high), "ok", len(resampled[name]))
    return out


def evaluate_task(
    y, s, subjects, y_tuning=None, s_tuning=None, n_bootstrap: int = N_BOOTSTRAP, seed: int = 0
) -> TaskMetrics:
    """AUROC, AUPRC (with subject-bootstrap CIs), F1 at the tuning split's best threshold, and ECE."""
    y, s = _check(y, s)
    subjects = np.asarray(subjects)
    threshold = best_f1_threshold(y_tuning, s_tuning) if y_tuning is not None and len(y_tuning) else None
    if threshold is None:
        f1 = MetricResult(None, status="undefined: no tuning positives to choose a threshold")
    else:
        f1 = bootstrap(lambda a, b: f1_at(a, b, threshold), y, s, subjects, n_bootstrap, seed)
    return TaskMetrics(
        n=len(y),
        positives=int(y.sum()),
        auroc=bootstrap(auroc, y, s, subjects, n_bootstrap, seed),
        auprc=bootstrap(average_precision, y, s, subjects, n_bootstrap, seed),
        f1=f1,
        threshold=threshold,
        ece=expected_calibration_error(y, s),
    )
