"""Training: exact resume after the process is killed, and predictions as probabilities."""

import math
import os
import signal
import subprocess
import sys
import time

import polars as pl
import pytest
import torch

from medstate.ehr.model import EhrMamba
from medstate.ehr.training import predict
from medstate.train.loop import TrainConfig
from medstate.train.schedules import learning_rate_factor
from tests.ehr.conftest import inputs_frame


def pretrain_command(prepared, run_dir):
    return [
        sys.executable, "-m", "medstate.cli", "ehr", "pretrain", str(prepared), str(run_dir),
        "--d-model", "16", "--n-layer", "1", "--max-steps", "24", "--save-every", "6", "--token-budget", "1024",
        "--warmup-steps", "4",
    ]  # fmt: skip


def final_loss(run_dir):
    log = pl.read_csv(run_dir / "log.csv")
    assert log["step"].to_list() == list(range(1, 25))
    return log["loss"].to_list()


def test_resume_after_kill_gives_the_same_run(prepared, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(pretrain_command(prepared, whole), check=True, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen(pretrain_command(prepared, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    state = killed / "checkpoints" / "last" / "trainer_state.pt"
    while time.time() < deadline:  # kill once a checkpoint past the first one exists
        if state.is_file() and torch.load(state, weights_only=True)["step"] >= 12:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    step_at_kill = torch.load(state, weights_only=True)["step"]
    assert 12 <= step_at_kill < 24
    resumed = subprocess.run(pretrain_command(prepared, killed), check=True, capture_output=True, text=True)
    assert "resumed from step" in resumed.stdout
    assert final_loss(killed) == final_loss(whole)  # every step's loss, to the printed digit
    a = EhrMamba.from_pretrained(whole / "checkpoints" / "last").state_dict()
    b = EhrMamba.from_pretrained(killed / "checkpoints" / "last").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (killed / "checkpoints" / "last" / "vocab.json").is_file()


def test_predictions_are_each_samples_own_probability(prepared, tmp_path):
    """Packed prediction against each sample scored alone: sigmoid of the class logit at its last token, in the
    row of its own (subject, task, visit), with its own label."""
    from medstate.ehr.batching import collate
    from medstate.ehr.sequences import ARRAYS

    subprocess.run(pretrain_command(prepared, tmp_path / "run"), check=True, capture_output=True)
    model = EhrMamba.from_pretrained(tmp_path / "run" / "checkpoints" / "last").eval()
    predictions = predict(model, prepared, "held_out")
    assert predictions.columns == ["subject_id", "task", "visit_key", "prediction_time", "y_true", "y_score"]
    samples = inputs_frame(prepared, "finetune").filter(pl.col("split") == "held_out")
    assert predictions.height == samples.height
    key = ["subject_id", "task", "visit_key"]
    by_key = {tuple(r[k] for k in key): r for r in predictions.iter_rows(named=True)}
    for row in samples.sample(25, seed=0).iter_rows(named=True):
        alone = collate([{name: row[name] for name in ARRAYS}])
        with torch.no_grad():
            logit = model(alone, ends=alone["ends"]).class_logits.double().item()
        got = by_key[tuple(row[k] for k in key)]
        assert got["y_score"] == pytest.approx(1 / (1 + math.exp(-logit)), rel=1e-4, abs=1e-6)
        assert got["y_true"] == row["label"]


def test_schedules():
    config = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine")
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(55, config) == pytest.approx(0.5)
    assert learning_rate_factor(100, config) == pytest.approx(0.0)
    assert learning_rate_factor(55, TrainConfig(max_steps=100, warmup_steps=10, schedule="linear")) == pytest.approx(
        0.5
    )


def test_a_resumed_run_refuses_other_sizes(prepared, tmp_path):
    from typer.testing import CliRunner

    from medstate.cli import app

    base = ["ehr", "pretrain", str(prepared), str(tmp_path / "run"), "--n-layer", "1", "--token-budget", "1024"]
    first = CliRunner().invoke(app, [*base, "--d-model", "16", "--max-steps", "2", "--save-every", "1"])
    assert first.exit_code == 0, first.output
    other = CliRunner().invoke(app, [*base, "--d-model", "32", "--max-steps", "3"])
    assert other.exit_code == 2 and "resumes a run at step 2 with d_model=16, not d_model=32" in other.output
    same = CliRunner().invoke(app, [*base, "--max-steps", "3"])  # sizes left out: the run's own
    assert same.exit_code == 0, same.output
    assert EhrMamba.from_pretrained(tmp_path / "run" / "checkpoints" / "last").config.d_model == 16
    assert pl.read_csv(tmp_path / "run" / "log.csv")["step"].to_list() == [1, 2, 3]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("mamba=runs/a/checkpoints/last@2", ("mamba", "runs/a/checkpoints/last", 2)), ("lstm=ck", ("lstm", "ck", 0))],
)
def test_model_reference_of_ehr_evaluate(spec, expected):
    from medstate.ehr.evaluate import ModelRef

    ref = ModelRef.parse(spec)
    assert (ref.name, str(ref.checkpoint), ref.seed) == expected


@pytest.mark.parametrize(
    ("spec", "message"), [("ck", "NAME=CHECKPOINT"), ("=ck", "NAME=CHECKPOINT"), ("m=ck@x", "seed")]
)
def test_a_bad_model_reference_is_one_named_error(spec, message):
    from medstate.ehr.evaluate import ModelRef
    from medstate.errors import MedstateError

    with pytest.raises(MedstateError, match=message):
        ModelRef.parse(spec)
