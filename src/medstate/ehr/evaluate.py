"""`medstate ehr evaluate`: finetuned models scored on the tuning and held-out splits, into one report."""

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
    predictions.parquet, report.md/html) in `output`; returns `write_report`'s result."""
    refs = [m if isinstance(m, ModelRef) else ModelRef.parse(m) for m in models]
    frames = [predictions_for_report(load_model(r.checkpoint), prepared, r.name, r.seed) for r in refs]
    return write_report(pl.concat(frames), Path(output), n_bootstrap=bootstrap)
