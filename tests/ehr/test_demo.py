"""The README's main path on the shipped demo data, with tiny settings (the full `make demo` takes ~6 minutes)."""

import json
from pathlib import Path

import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from medstate.ehr.demo import DemoSettings, run_demo

DEMO = Path(__file__).resolve().parents[2] / "data" / "demo"


def test_demo_path_end_to_end(tmp_path):
    settings = DemoSettings(max_length=128, d_model=16, n_layer=1, pretrain_steps=3, finetune_steps=3, bootstrap=20)
    result = run_demo(DEMO, tmp_path / "demo", settings, say=lambda text: None)
    out = tmp_path / "demo"
    for name in ("report.html", "report.md", "metrics.json", "predictions.parquet", "timings.csv", "demo_timings.csv"):
        assert (out / name).is_file(), name
    predictions = pl.read_parquet(out / "predictions.parquet")
    assert {"subject_id", "task", "model", "seed", "y_true", "y_score"} <= set(predictions.columns)
    assert set(predictions["task"]) == {
        "mortality_30d", "los_7d", "readmission_30d", "hypertension_onset", "fluid_electrolyte_onset", "lipid_onset"
    }  # fmt: skip
    metrics = json.loads((out / "metrics.json").read_text())
    for row in metrics["per_seed"]:
        held_out = predictions.filter(
            (pl.col("task") == row["task"]) & (pl.col("model") == row["model"]) & (pl.col("split") == "held_out")
        )
        if row["auroc"]["value"] is not None:
            assert row["auroc"]["value"] == pytest.approx(
                roc_auc_score(held_out["y_true"], held_out["y_score"]), abs=1e-12
            )
    assert set(predictions["model"]) == {"ehrmamba", "lstm", "xgboost"}
    assert result["report"] == out / "report.html"
