"""Tasks as MEDS label files: a cohort extracted by ACES (`aces-cli`, in its own environment: `make meds-tools`)
from the demo data, prepared as a `meds_labels` task and finetuned on. Every input equals the whole-cohort build
of test_store, and the samples are exactly ACES's rows."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from medstate.ehr.evaluate import evaluate_models
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.sequences import REGISTER, VISIT_END
from medstate.ehr.store import Samples
from medstate.ehr.tasks import TaskSuite
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError
from tests.ehr.test_store import assert_inputs_equal, whole_cohort

REPO = Path(__file__).resolve().parents[2]
# death within 30 days of the first day of an admission, predicted 24 h in, for those still in hospital then
ACES_TASK = """
predicates:
  admission: {code: {regex: "^HOSPITAL_ADMISSION//.*"}}
  discharge: {code: {regex: "^HOSPITAL_DISCHARGE//.*"}}
  death: {code: MEDS_DEATH}
  discharge_or_death: {expr: "or(discharge, death)"}
trigger: admission
windows:
  input:
    start: null
    end: trigger + 24h
    start_inclusive: true
    end_inclusive: true
    index_timestamp: end
  gap:
    start: trigger
    end: start + 24h
    start_inclusive: false
    end_inclusive: true
    has: {discharge_or_death: "(None, 0)"}
  target:
    start: gap.end
    end: start + 30d
    start_inclusive: false
    end_inclusive: true
    label: death
"""


@pytest.fixture(scope="module")
def aces_labels(mimic_csv_meds, tmp_path_factory):
    cli = os.environ.get("MEDSTATE_ACES_CLI") or str(REPO / ".venv-meds" / "bin" / "aces-cli")
    if not os.path.isfile(cli):
        cli = shutil.which("aces-cli")
    if not cli:
        pytest.skip("aces-cli not found: `make meds-tools` builds .venv-meds with ACES (or set MEDSTATE_ACES_CLI)")
    meds = Path(mimic_csv_meds.summary.output)
    root = tmp_path_factory.mktemp("aces")
    (root / "death_30d.yaml").write_text(ACES_TASK)
    shards = ",".join(
        str(p.relative_to(meds / "data").with_suffix("")) for p in sorted((meds / "data").rglob("*.parquet"))
    )
    command = [cli, "--multirun", "data=sharded", "data.standard=meds", f"data.root={meds / 'data'}",
               f"data.shard={shards}", f"cohort_dir={root}", "cohort_name=death_30d",
               f"config_path={root / 'death_30d.yaml'}", "hydra/launcher=basic"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (root / "cli").write_text(cli)
    return root


def aces_cli_path(labels: Path) -> str:
    return (labels / "cli").read_text()


def test_an_aces_cohort_is_prepared_and_trained_on(mimic_csv_meds, aces_labels, tmp_path):
    written = pl.read_parquet(aces_labels / "death_30d" / "**" / "*.parquet")
    assert len(written) > 20 and 0 < written["boolean_value"].sum() < len(written)
    tasks = tmp_path / "tasks.yaml"
    tasks.write_text(f"tasks:\n  - {{name: death_30d, kind: meds_labels, labels: {aces_labels / 'death_30d'}}}\n")
    config = PrepareConfig(max_length=200, tasks=str(tasks))
    out = tmp_path / "prepared"
    prepare(mimic_csv_meds.summary.output, out, config, shard_subjects=30)
    stored = Samples.read(out, "finetune")
    got = stored.frame.select("subject_id", "prediction_time", pl.col("label").cast(pl.Boolean)).sort(pl.all())
    expected = written.select(
        pl.col("subject_id").cast(pl.Int64), pl.col("prediction_time").cast(pl.Datetime("us")),
        pl.col("boolean_value").alias("label"),
    ).sort(pl.all())  # fmt: skip
    assert got.equals(expected)  # ACES's rows, one sample each, with their labels
    assert_inputs_equal(out, *whole_cohort(mimic_csv_meds.summary.output, config))
    # ACES predicts 24 h into a stay that goes on (no discharge in the gap): the input shows the stay still open,
    # so the token before the closing task token is never the [VE] [REG] of a closed visit
    vocab = Vocabulary.load(out / "vocab.json")
    closing = {vocab.index[VISIT_END], vocab.index[REGISTER]}
    assert not any(int(arrays["input_ids"][-2]) in closing for arrays in stored.arrays)
    run = tmp_path / "run"
    settings = tmp_path / "finetune.yaml"
    settings.write_text("sizes: {d_model: 16, n_layer: 1}\ntoken_budget: 1024\ntrain: {max_steps: 4, save_every: 4}\n")
    train = [sys.executable, "-m", "medstate.cli", "ehr", "finetune", str(out), str(run), "--config", str(settings)]
    subprocess.run(train, check=True, capture_output=True, timeout=600)
    assert pl.read_csv(run / "log.csv")["step"].to_list() == [1, 2, 3, 4]
    # predictions out in meds-evaluation's schema, read by meds-evaluation itself
    evaluate_models(out, tmp_path / "eval", [f"aces={run / 'checkpoints' / 'last'}"], bootstrap=20)
    ours = pl.read_parquet(tmp_path / "eval" / "predictions.parquet").filter(pl.col("split") == "held_out")
    path = tmp_path / "eval" / "meds_predictions" / "aces" / "seed0" / "death_30d" / "held_out.parquet"
    meds = pl.read_parquet(path)
    assert meds.columns == ["subject_id", "prediction_time", "boolean_value", "predicted_boolean_value",
                            "predicted_boolean_probability"]  # fmt: skip
    assert meds["boolean_value"].to_list() == (ours["y_true"] == 1).to_list()
    assert meds["predicted_boolean_value"].to_list() == (ours["y_score"] >= 0.5).to_list()
    evaluation = Path(os.path.dirname(aces_cli_path(aces_labels))) / "meds-evaluation-cli"
    if evaluation.is_file():
        result = tmp_path / "meds-evaluation.json"
        command = [str(evaluation), f"predictions_path={path}", f"output_file={result}"]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        assert set(json.loads(result.read_text())) >= {"samples_equally_weighted", "subjects_equally_weighted"}


def test_a_label_file_without_meds_columns_is_one_error(tmp_path):
    pl.DataFrame({"subject_id": [1], "time": [None]}).write_parquet(tmp_path / "bad.parquet")
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: t, kind: meds_labels, labels: bad.parquet}\n")
    with pytest.raises(MedstateError, match=r"bad\.parquet lacks prediction_time, boolean_value"):
        TaskSuite.load(tmp_path / "tasks.yaml")
    (tmp_path / "tasks.yaml").write_text("tasks:\n  - {name: t, kind: meds_labels, labels: missing}\n")
    with pytest.raises(MedstateError, match=r"label file .*missing not found"):
        TaskSuite.load(tmp_path / "tasks.yaml")
