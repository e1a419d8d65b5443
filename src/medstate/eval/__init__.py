"""Evaluation: metrics from probabilities with subject-level bootstrap intervals, calibration."""

from medstate.eval.metrics import (
    MetricResult,
    TaskMetrics,
    auroc,
    average_precision,
    best_f1_threshold,
    bootstrap,
    evaluate_task,
    expected_calibration_error,
    f1_at,
    format_interval,
    macro_f1,
    wilson_interval,
)

__all__ = [
    "MetricResult",
    "TaskMetrics",
    "auroc",
    "average_precision",
    "best_f1_threshold",
    "bootstrap",
    "evaluate_task",
    "expected_calibration_error",
    "f1_at",
    "format_interval",
    "macro_f1",
    "wilson_interval",
]
