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
    ["text"],
    ["text", "tokenizer"],
    ["text", "pretrain"],
    ["text", "eval"],
    ["text", "sft"],
    ["text", "generate"],
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


TASKS_OK = "tasks:\n  - {name: x, kind: duration_over, duration_days: 3}\n"
HF_CONFIG = {"model_type": "mamba", "vocab_size": 40, "hidden_size": 8, "num_hidden_layers": 1}
BAD_INPUTS = {
    # case: (files to write, arguments (with {d} the case's directory), words the one line must contain)
    "k with a non-number": ({}, ["ehr", "forecast", "{d}/p", "{d}/c", "{d}/o", "--k", "5,x"], ["--k", "'x'"]),
    "seeds with a non-number": ({}, ["ehr", "benchmark", "{d}/p", "{d}/r", "--seeds", "0,x"], ["--seeds", "'x'"]),
    "HF config without vocab_size": (
        {"ck/config.json": json.dumps({k: v for k, v in HF_CONFIG.items() if k != "vocab_size"})},
        ["ssm", "info", "{d}/ck"],
        ["config.json", "vocab_size"],
    ),
    "truncated shard index": (
        {"ck/config.json": json.dumps(HF_CONFIG), "ck/model.safetensors.index.json": '{"weight_map": {"a": '},
        ["ssm", "info", "{d}/ck"],
        ["model.safetensors.index.json", "not valid JSON"],
    ),
    "benchmark model with an unknown key": (
        {"s.yaml": "models:\n  - {name: x, kind: lstm, colour: red}\n"},
        ["ehr", "benchmark", "{d}/p", "{d}/r", "--settings", "{d}/s.yaml"],
        ["s.yaml", "models[0]", "colour"],
    ),
    "settings that are a list": (
        {"s.yaml": "- 1\n- 2\n"},
        ["ehr", "benchmark", "{d}/p", "{d}/r", "--settings", "{d}/s.yaml"],
        ["s.yaml", "mapping"],
    ),
    "visit set with an unknown key": (
        {"t.yaml": TASKS_OK + "visit_sets:\n  v: {rules: [{start: a, end: b, key: k}], colour: red}\n"},
        ["ehr", "prepare", "{d}/meds", "--out", "{d}/out", "--tasks", "{d}/t.yaml"],
        ["t.yaml", "visit_sets.v", "colour"],
    ),
    "code set entry without code": (
        {"t.yaml": TASKS_OK + "code_sets:\n  c: [{match: exact}]\n"},
        ["ehr", "prepare", "{d}/meds", "--out", "{d}/out", "--tasks", "{d}/t.yaml"],
        ["t.yaml", "code_sets.c[0]", "code"],
    ),
    "exclude-codes that is no pattern": (
        {},
        ["data", "compare", "{d}/a", "{d}/b", "--exclude-codes", "("],
        ["--exclude-codes", "regular expression"],
    ),
    "unknown time zone": (
        {"in/a.ndjson": "{}"},
        ["data", "convert", "-f", "fhir", "{d}/in", "{d}/out", "--timezone", "Mars/Olympus"],
        ["time zone", "Mars/Olympus"],
    ),
    "evaluate seed that is no number": (
        {},
        ["ehr", "evaluate", "{d}/p", "{d}/o", "--model", "m={d}/ck@x"],
        ["seed", "'x'"],
    ),
    "EHR checkpoint config with a wrong type": (
        {"ck/config.json": json.dumps({"model_type": "medstate-ehrmamba", "vocab_size": "many"})},
        ["ehr", "forecast", "{d}/p", "{d}/ck", "{d}/o"],
        ["config.json", "vocab_size"],
    ),
    "pretraining config with an unknown key": (
        {"p.yaml": "tokenizer: t\ncorpora: [{name: a, path: a.jsonl}]\nbatchsize: 4\n"},
        ["text", "pretrain", "{d}/p.yaml", "{d}/run"],
        ["p.yaml", "batchsize"],
    ),
    "WSD fractions that do not sum to 1": (
        {
            "p.yaml": "tokenizer: t\ncorpora: [{name: a, path: a.jsonl}]\n"
            "train: {schedule: wsd, wsd_fractions: [0.1, 0.65, 0.2]}\n"
        },
        ["text", "pretrain", "{d}/p.yaml", "{d}/run"],
        ["p.yaml", "train", "wsd_fractions"],
    ),
    "corpus with a negative weight": (
        {"c.yaml": "corpora: [{name: a, path: a.jsonl, weight: -1}]\n"},
        ["text", "tokenizer", "{d}/c.yaml", "{d}/tok"],
        ["c.yaml", "weight"],
    ),
    "corpus file that is not JSON Lines": (
        {"c.yaml": "corpora: [{name: a, path: a.jsonl}]\n", "a.jsonl": "{broken\n"},
        ["text", "tokenizer", "{d}/c.yaml", "{d}/tok"],
        ["a.jsonl:1", "not valid JSON"],
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_a_users_mistake_is_one_line_exit_2(case, tmp_path):
    files, args, words = BAD_INPUTS[case]
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    result = runner.invoke(app, [a.replace("{d}", str(tmp_path)) for a in args])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, (result.output, result.exception)
    assert len(lines) == 1 and lines[0].startswith("medstate: error:"), result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], (word, lines[0])


LOADED = """
import sys
from typer.testing import CliRunner
from medstate.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
assert result.exit_code == 0, result.output
print(",".join(sorted(m for m in sys.modules if m == "torch" or m.startswith("medstate.cli."))))
"""


@pytest.mark.parametrize(
    ("argv", "loaded"),
    [
        (["--help"], ""),  # the listing imports no sub-command and no torch
        (["data", "--help"], "medstate.cli.common,medstate.cli.data"),
        (["serve-token", "--help"], "medstate.cli.common,medstate.cli.serve,torch"),
    ],
)
def test_a_sub_command_loads_only_its_own_module(argv, loaded):
    out = subprocess.run([sys.executable, "-c", LOADED, *argv], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == loaded


def test_the_listing_shows_every_sub_command_with_its_help():
    result = runner.invoke(app, ["--help"], env={"COLUMNS": "200"})
    for name in ("version", "serve", "serve-rebuild", "ssm", "data", "ehr", "text", "vision", "serve-token"):
        assert f" {name} " in result.output
    assert "EhrMamba: patient sequences, tasks, models, evaluation." in result.output
    serve = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"}).output
    assert "--ssl-certfile" in serve and "COMMAND" not in serve  # the command itself, not its module's group
