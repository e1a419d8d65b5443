"""The command line: help everywhere, one-line user errors with exit code 2, working sub-commands."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from medstate.cli import app
from medstate.ssm import MambaLM, SSMConfig

runner = CliRunner()


COMMANDS = [
    [],
    ["ssm"],
    ["ssm", "info"],
    ["ssm", "convert"],
    ["ssm", "generate"],
    ["ssm", "demo"],
    ["version"],
    ["data"],
    ["data", "describe"],
    ["data", "convert"],
    ["data", "compare"],
    ["ehr"],
    ["ehr", "prepare"],
    ["ehr", "pretrain"],
    ["ehr", "finetune"],
    ["ehr", "evaluate"],
    ["ehr", "explain"],
    ["ehr", "forecast"],
    ["ehr", "benchmark"],
    ["ehr", "demo"],
]


@pytest.mark.parametrize("args", COMMANDS)
def test_help(args):
    result = runner.invoke(app, [*args, "--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_user_error_is_one_line_exit_2(tmp_path):
    # a real process, so that the exit code and stderr are what a user sees
    proc = subprocess.run(
        [sys.executable, "-m", "medstate.cli", "ssm", "info", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_convert_info_generate(tmp_path):
    model = MambaLM(SSMConfig(version=2, vocab_size=40, d_model=16, n_layer=1, d_state=4, head_dim=8)).eval()
    model.save_pretrained(tmp_path / "a")
    assert runner.invoke(app, ["ssm", "convert", str(tmp_path / "a"), str(tmp_path / "b")]).exit_code == 0
    info = runner.invoke(app, ["ssm", "info", str(tmp_path / "b")])
    assert info.exit_code == 0 and "Mamba-2" in info.output
    result = runner.invoke(app, ["ssm", "generate", str(tmp_path / "b"), "--ids", "1,2,3", "--max-new-tokens", "5"])
    assert result.exit_code == 0
    produced = [int(t) for t in result.output.strip().splitlines()[-1].split(",")]
    expected = model.generate(torch.tensor([[1, 2, 3]]), 5)[0, 3:].tolist()
    assert produced == expected
    bad = runner.invoke(app, ["ssm", "generate", str(tmp_path / "b"), "--ids", "1,x"])
    assert bad.exit_code == 2


def test_demo_learns_and_writes_run_directory(tmp_path):
    result = runner.invoke(app, ["ssm", "demo", "--out", str(tmp_path / "run"), "--steps", "120"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (tmp_path / "run" / "config.yaml").is_file()
    assert metrics["checkpoint_reload_identical"] is True
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"]
    assert metrics["next_token_accuracy"] > 0.9
