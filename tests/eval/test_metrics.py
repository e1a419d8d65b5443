"""Metrics against scikit-learn on the same predictions, and the undefined cases."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from medstate.eval import auroc, average_precision, best_f1_threshold, bootstrap, evaluate_task, f1_at
from medstate.eval.metrics import expected_calibration_error


@pytest.mark.parametrize("seed", range(6))
def test_against_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 400))
    y = (rng.random(n) < rng.uniform(0.05, 0.6)).astype(int)
    if y.sum() in (0, n):
        y[:2] = [0, 1]
    # rounded scores make ties, the hard part
    s = np.round(np.clip(y * rng.uniform(0, 0.4) + rng.random(n) * 0.8, 0, 1), int(rng.integers(1, 4)))
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    threshold = float(np.median(s))
    assert f1_at(y, s, threshold) == pytest.approx(f1_score(y, s >= threshold), abs=1e-12)
    best = best_f1_threshold(y, s)
    assert f1_at(y, s, best) == pytest.approx(max(f1_score(y, s >= t, zero_division=0) for t in np.unique(s)))


def test_undefined_cases_are_reported_not_nan():
    y, s = np.zeros(10, dtype=int), np.linspace(0, 1, 10)
    assert auroc(y, s) is None and average_precision(y, s) is None
    result = evaluate_task(y, s, subjects=np.arange(10), y_tuning=y, s_tuning=s, n_bootstrap=50)
    assert result.auroc.value is None and result.auroc.status == "undefined: no positives"
    assert result.f1.status.startswith("undefined") and result.positives == 0
    assert auroc(np.ones(4, dtype=int), s[:4]) is None


def test_subject_bootstrap_interval():
    rng = np.random.default_rng(0)
    subjects = np.repeat(np.arange(60), 3)
    y = rng.integers(0, 2, 180)
    s = np.clip(y * 0.3 + rng.random(180) * 0.7, 0, 1)
    result = bootstrap(auroc, y, s, subjects, n=200, seed=1)
    assert result.low < result.value < result.high and result.resamples == 200
    again = bootstrap(auroc, y, s, subjects, n=200, seed=1)
    assert (again.low, again.high) == (result.low, result.high)  # seeded


def test_calibration_error():
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([0.0, 0.0, 1.0, 1.0])) == 0.0
    assert expected_calibration_error(y, np.array([0.5, 0.5, 0.5, 0.5])) == pytest.approx(0.0)
    assert expected_calibration_error(np.array([1, 1]), np.array([0.25, 0.25])) == pytest.approx(0.75)


def test_bootstrap_resamples_subjects_for_a_95_percent_interval():
    """40 subjects of 50 identical rows, 20 of them positive; the metric is the positive rate. Resampling subjects,
    the rate is Binomial(40, 1/2) / 40: its 2.5% and 97.5% quantiles are 14/40 and 26/40 (a 90% interval would give
    15/40 and 25/40; resampling rows would give about 0.48 and 0.52)."""
    from scipy.stats import binom

    subjects = np.repeat(np.arange(40), 50)
    y = (subjects < 20).astype(int)
    result = bootstrap(lambda a, b: float(np.mean(a)), y, np.zeros(len(y)), subjects, n=4000, seed=0)
    assert binom.ppf(0.025, 40, 0.5) / 40 == 0.35 and binom.ppf(0.975, 40, 0.5) / 40 == 0.65
    assert result.low == pytest.approx(0.35, abs=0.01) and result.high == pytest.approx(0.65, abs=0.01)


def test_f1_threshold_comes_from_the_tuning_split():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(3)
    y_tune, y_test = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    s_tune = np.round(np.clip(y_tune * 0.2 + rng.random(200) * 0.8, 0, 1), 2)
    s_test = np.round(np.clip(y_test * 0.5 + rng.random(200) * 0.5, 0, 1), 2)
    best_tune = max(np.unique(s_tune), key=lambda t: f1_score(y_tune, s_tune >= t))
    best_test = max(np.unique(s_test), key=lambda t: f1_score(y_test, s_test >= t))
    assert best_tune != best_test  # the splits disagree, so the test can tell which one chose
    result = evaluate_task(y_test, s_test, np.arange(200), y_tuning=y_tune, s_tuning=s_tune, n_bootstrap=10)
    assert result.threshold == pytest.approx(best_tune)
    assert result.f1.value == pytest.approx(f1_score(y_test, s_test >= best_tune))
