"""`medstate ehr evaluate`: finetuned models scored on the tuning and held-out splits, into one report, and the
predictions in the MEDS ecosystem's layout (`meds-evaluation`'s prediction schema: subject_id, prediction_time,
boolean_value, predicted_boolean_value, predicted_boolean_probability) under
`meds_predictions/<model>/seed<seed>/<task>/<split>.parquet`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.ehr.training import load_model, predictions_for_report
from medstate.errors import MedstateError
from medstate.eval.report import write_report
from medstate.loading import parse_list


@dataclass(frozen=True)
class ModelRef:
    """A finetuned model in the report: its name, checkpoint and training seed."""

    name: str
    checkpoint: Path
    seed: int = 0

    @classmethod
    def parse(cls, spec: str) -> ModelRef:
        """`NAME=CHECKPOINT[@SEED]`."""
        name, _, rest = spec.partition("=")
        checkpoint, _, seed = rest.partition("@")
        if not name or not checkpoint:
            raise MedstateError(f"--model wants NAME=CHECKPOINT[@SEED], got {spec!r}")
        return cls(name, Path(checkpoint), parse_list(seed, int, f"--model {spec}: seed")[0] if seed else 0)


def evaluate_models(
    prepared: str | Path, output: str | Path, models: Sequence[ModelRef | str], bootstrap: int = 1000
) -> dict:
    """Every model's tuning and held-out predictions, and the report of them all (metrics.json,
    predictions.parquet, report.md/html, meds_predictions/) in `output`; returns `write_report`'s result."""
    refs = [m if isinstance(m, ModelRef) else ModelRef.parse(m) for m in models]
    predictions = pl.concat([predictions_for_report(load_model(r.checkpoint), prepared, r.name, r.seed) for r in refs])
    write_meds_predictions(predictions, Path(output) / "meds_predictions")
    return write_report(predictions, Path(output), n_bootstrap=bootstrap)


def write_meds_predictions(predictions: pl.DataFrame, folder: Path, threshold: float = 0.5) -> list[Path]:
    """One file per model, seed, task and split in meds-evaluation's schema; `predicted_boolean_value` is the
    probability at or above `threshold`."""
    written = []
    for (model, seed, task, split), part in predictions.partition_by(
        "model", "seed", "task", "split", as_dict=True, maintain_order=True
    ).items():
        path = folder / str(model) / f"seed{seed}" / str(task) / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        part.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(pl.Datetime("us")),
            pl.col("y_true").cast(pl.Boolean).alias("boolean_value"),
            (pl.col("y_score") >= threshold).alias("predicted_boolean_value"),
            pl.col("y_score").cast(pl.Float32).alias("predicted_boolean_probability"),
        ).write_parquet(path)
        written.append(path)
    return written
