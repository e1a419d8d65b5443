"""The benchmark protocol end to end at toy size (every model kind), its resume, and the explain and forecast
commands on its checkpoints."""

import json

import polars as pl
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medstate.cli import app
from medstate.ehr.benchmark import BenchmarkSettings

runner = CliRunner()
MODELS = "xgboost,ehrmamba,ehrmamba-single,lstm,bert,multibird"


@pytest.fixture(scope="module")
def benchmark(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("bench")
    settings = run / "settings.yaml"
    settings.write_text(
        yaml.safe_dump(
            {
                "d_model": 16,
                "n_layer": 1,
                "pretrain_steps": 2,
                "finetune_steps": 2,
                "single_task_steps": 1,
                "token_budget": 1024,
                "bootstrap": 20,
            }
        )
    )
    args = ["ehr", "benchmark", str(prepared), str(run / "out"), "--settings", str(settings)]
    first = runner.invoke(app, [*args, "--seeds", "0", "--models", MODELS])
    assert first.exit_code == 0, first.output
    return run / "out", args, first.output


def test_every_model_seed_and_task_is_reported(benchmark, prepared):
    out, _, output = benchmark
    predictions = pl.read_parquet(out / "predictions.parquet")
    tasks = set(pl.read_parquet(prepared / "labels.parquet")["task"].unique())
    assert set(predictions["model"].unique()) == set(MODELS.split(","))
    assert set(predictions["seed"].unique()) == {0}
    for (model,), group in predictions.group_by("model"):
        assert set(group["task"].unique()) == tasks, model
    assert (out / "pretrain" / "bigbird" / "seed0" / "checkpoints" / "last").is_dir()  # MultiBird's pretraining
    assert len(list((out / "finetune" / "ehrmamba-single" / "seed0").iterdir())) == len(tasks)  # one per task
    metrics = json.loads((out / "metrics.json").read_text())
    for row in metrics["per_seed"]:
        held = predictions.filter(
            (pl.col("model") == row["model"]) & (pl.col("seed") == row["seed"]) & (pl.col("task") == row["task"])
            & (pl.col("split") == "held_out")
        )  # fmt: skip
        if row["auroc"]["value"] is not None:
            assert row["auroc"]["value"] == pytest.approx(roc_auc_score(held["y_true"], held["y_score"]), abs=1e-12)
    timings = pl.read_csv(out / "timings.csv")
    assert {"pretrain ehrmamba", "pretrain bert", "predict all tasks", "predict mortality_30d", "total"} <= set(
        timings["stage"]
    )
    assert not timings["resumed"].any()
    shared = timings.filter(pl.col("stage").str.starts_with("pretrain"))  # timed once, by the first model of a kind
    assert sorted(shared["model"]) == ["bert", "ehrmamba", "multibird"]
    assert (out / "report.html").is_file() and "xgboost" in output
    recorded = BenchmarkSettings.from_yaml(out / "benchmark.yaml")  # a run's record is a settings file
    assert (recorded.d_model, recorded.pretrain_steps, recorded.seeds) == (16, 2, [0])


def test_rerun_skips_finished_cells_and_adds_seeds(benchmark):
    out, args, _ = benchmark
    before = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    again = runner.invoke(app, [*args, "--seeds", "0,1", "--models", "ehrmamba,xgboost"])
    assert again.exit_code == 0, again.output
    assert again.output.count("done earlier") == 2  # seed 0 of both
    after = {p.name: p.stat().st_mtime_ns for p in (out / "predictions").iterdir()}
    assert after == {
        **before,
        "xgboost-seed1.parquet": after["xgboost-seed1.parquet"],
        "ehrmamba-seed1.parquet": after["ehrmamba-seed1.parquet"],
    }
    summary = json.loads((out / "metrics.json").read_text())["summary"]
    assert {(r["model"], r["seeds"]) for r in summary if r["model"] in ("ehrmamba", "lstm")} == {
        ("ehrmamba", 2),
        ("lstm", 1),
    }


def test_resumed_stages_are_marked(benchmark):
    out, args, _ = benchmark
    (out / "predictions" / "ehrmamba-single-seed0.parquet").unlink()
    longer = yaml.safe_load((out.parent / "settings.yaml").read_text()) | {"single_task_steps": 2}
    (out.parent / "longer.yaml").write_text(yaml.safe_dump(longer))
    before = len(pl.read_csv(out / "timings.csv"))
    args = [*args[:-1], str(out.parent / "longer.yaml")]
    again = runner.invoke(app, [*args, "--seeds", "0", "--models", "ehrmamba-single"])
    assert again.exit_code == 0, again.output
    rows = pl.read_csv(out / "timings.csv")[before:]
    finetuned = rows.filter(pl.col("stage").str.starts_with("finetune"))
    predicted = rows.filter(pl.col("stage").str.starts_with("predict"))
    assert len(finetuned) == len(predicted) > 1 and finetuned["resumed"].all()  # each task: from step 1 to 2
    assert not rows["stage"].str.starts_with("pretrain").any()  # its pretraining was done and is not re-timed
    assert rows.filter(pl.col("stage") == "total")["resumed"].to_list() == [True]


def test_explain_and_forecast_commands(benchmark, prepared, tmp_path):
    out, _, _ = benchmark
    finetuned = out / "finetune" / "ehrmamba" / "seed0" / "checkpoints" / "last"
    result = runner.invoke(
        app, ["ehr", "explain", str(prepared), str(finetuned), str(tmp_path / "ig"), "--task", "readmission_30d",
              "--count", "2", "--steps", "16"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    attributions = sorted((tmp_path / "ig").glob("*.csv"))
    assert len(attributions) == 2 and len(list((tmp_path / "ig").glob("*.png"))) == 2
    table = pl.read_csv(attributions[0])
    assert table.columns == ["position", "token", "days", "attribution"] and table["attribution"].is_finite().all()
    pretrained = out / "pretrain" / "ehrmamba" / "seed0" / "checkpoints" / "last"
    result = runner.invoke(
        app, ["ehr", "forecast", str(prepared), str(pretrained), str(tmp_path / "fc"), "--samples", "2",
              "--max-new-tokens", "6", "--k", "5,10"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "fc" / "forecast.json").read_text())
    assert {r["ranking"] for r in summary["summary"]} == {"ehrmamba", "population frequency", "patient history"}
    lstm = out / "finetune" / "lstm" / "seed0" / "checkpoints" / "last"
    refused = runner.invoke(app, ["ehr", "forecast", str(prepared), str(lstm), str(tmp_path / "x")])
    assert refused.exit_code == 2 and "EhrMamba" in refused.output


def test_timings_from_an_older_run_read_as_not_resumed(tmp_path):
    from medstate.ehr.benchmark import _Timings

    path = tmp_path / "timings.csv"
    path.write_text("model,seed,stage,seconds\nlstm,0,finetune all tasks,12.5\n")  # no `resumed` column
    said = []
    timings = _Timings(path, said.append)
    with timings.cell("lstm", 1, resumed=False), timings.stage("lstm", 1, "finetune all tasks"):
        pass
    rows = pl.read_csv(path)
    assert rows["resumed"].to_list() == [False, False, False]
    assert rows["stage"].to_list() == ["finetune all tasks", "finetune all tasks", "total"]
    assert said[-1].startswith("lstm seed 1: total in")
