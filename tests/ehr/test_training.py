"""Training: exact resume after the process is killed, and predictions as probabilities."""

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
from medstate.train.loop import TrainConfig, learning_rate_factor


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


def test_predictions_are_probabilities(prepared, tmp_path):
    subprocess.run(pretrain_command(prepared, tmp_path / "run"), check=True, capture_output=True)
    model = EhrMamba.from_pretrained(tmp_path / "run" / "checkpoints" / "last")
    predictions = predict(model, prepared, "held_out")
    assert predictions.columns == ["subject_id", "task", "visit_key", "prediction_time", "y_true", "y_score"]
    assert predictions.height > 0 and predictions["y_score"].is_between(0, 1).all()
    assert predictions["y_score"].n_unique() > 10  # scores, not hard labels


def test_schedules():
    config = TrainConfig(max_steps=100, warmup_steps=10, schedule="cosine")
    assert learning_rate_factor(0, config) == pytest.approx(0.1)
    assert learning_rate_factor(9, config) == pytest.approx(1.0)
    assert learning_rate_factor(55, config) == pytest.approx(0.5)
    assert learning_rate_factor(100, config) == pytest.approx(0.0)
    assert learning_rate_factor(55, TrainConfig(max_steps=100, warmup_steps=10, schedule="linear")) == pytest.approx(
        0.5
    )
