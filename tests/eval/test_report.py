"""The report: metrics.json agrees with scikit-learn on predictions.parquet; undefined cases are stated."""

import json

import numpy as np
import polars as pl
import pytest
from sklearn.metrics import roc_auc_score

from medstate.eval.report import write_report


def predictions():
    rng = np.random.default_rng(0)
    rows = []
    for model, skill in (("ehrmamba", 0.4), ("xgboost", 0.2)):
        for seed in (0, 1):
            for task in ("mortality_30d", "rare_onset"):
                for split in ("tuning", "held_out"):
                    for subject in range(40):
                        for _ in range(2):
                            y = int(rng.random() < 0.3) if task == "mortality_30d" or split == "tuning" else 0
                            score = float(np.clip(y * skill + rng.random() * (1 - skill), 0, 1))
                            rows.append((subject, task, model, seed, split, y, score))
    return pl.DataFrame(
        rows, schema=["subject_id", "task", "model", "seed", "split", "y_true", "y_score"], orient="row"
    )


def test_report_matches_scikit_learn(tmp_path):
    write_report(predictions(), tmp_path, n_bootstrap=100)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    stored = pl.read_parquet(tmp_path / "predictions.parquet")
    for row in metrics["per_seed"]:
        if row["task"] != "mortality_30d":
            continue
        mine = stored.filter(
            (pl.col("model") == row["model"]) & (pl.col("seed") == row["seed"]) & (pl.col("task") == row["task"])
            & (pl.col("split") == "held_out")
        )  # fmt: skip
        assert row["auroc"]["value"] == pytest.approx(roc_auc_score(mine["y_true"], mine["y_score"]), abs=1e-12)
        assert row["auroc"]["low"] < row["auroc"]["value"] < row["auroc"]["high"]
    rare = [s for s in metrics["summary"] if s["task"] == "rare_onset"]
    assert all(s["auroc"]["mean"] is None and s["auroc"]["status"] == "undefined: no positives" for s in rare)
    report = (tmp_path / "report.md").read_text()
    assert "undefined: no positives" in report and "nan" not in report.lower()
    html = (tmp_path / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2
    assert (tmp_path / "plots" / "mortality_30d.png").stat().st_size > 10_000


def test_seed_spread_single_seed_interval_and_undefined_f1(tmp_path):
    frame = predictions()
    result = write_report(frame, tmp_path / "two", n_bootstrap=50)
    per_seed = {(r["model"], r["seed"], r["task"]): r for r in result["per_seed"]}
    entry = next(s for s in result["summary"] if (s["model"], s["task"]) == ("ehrmamba", "mortality_30d"))
    values = [per_seed[("ehrmamba", seed, "mortality_30d")]["auroc"]["value"] for seed in (0, 1)]
    assert entry["auroc"]["std"] == pytest.approx(abs(values[0] - values[1]) / np.sqrt(2))  # sample sd of two
    report = (tmp_path / "two" / "report.md").read_text()
    assert f"{np.mean(values):.3f} ± {abs(values[0] - values[1]) / np.sqrt(2):.3f}" in report
    rare = next(s for s in result["summary"] if (s["model"], s["task"]) == ("ehrmamba", "rare_onset"))
    assert rare["f1"]["mean"] is None and rare["f1"]["status"].startswith("undefined")  # no held-out positives
    one = write_report(frame.filter(pl.col("seed") == 0), tmp_path / "one", n_bootstrap=50)
    seed0 = per_seed[("ehrmamba", 0, "mortality_30d")]["auroc"]
    single = (tmp_path / "one" / "report.md").read_text()
    assert f"{seed0['value']:.3f} ({seed0['low']:.3f}–{seed0['high']:.3f})" in single and "± 0.000" not in single
    assert all(s["auroc"]["std"] is None for s in one["summary"])
