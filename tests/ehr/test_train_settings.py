"""`ehr pretrain` / `finetune` settings: flags only, or `--config FILE` with the flags given on top; the same
`EhrTrainSettings.read` from Python. The expected settings are written out by hand here, not computed by the code."""

import pytest
from typer.testing import CliRunner

import medstate.cli.ehr as ehr_cli
from medstate.cli import app
from medstate.ehr.training import EhrTrainSettings
from medstate.errors import MedstateError
from medstate.ssm.lora import LoraSettings
from medstate.train.loop import TrainConfig, TrainResult

runner = CliRunner()


@pytest.fixture
def captured(monkeypatch):
    """The settings each command hands to `run_training` (nothing is trained)."""
    seen = []

    def fake_run(stage, prepared, run_dir, settings, progress=None):
        seen.append((stage, settings))
        return TrainResult(steps=settings.train.max_steps, last_loss=0.0, resumed_from=None, seconds=0.0)

    monkeypatch.setattr(ehr_cli, "run_training", fake_run)
    return seen


def run(*args):
    result = runner.invoke(app, ["ehr", *args])
    assert result.exit_code == 0, result.output
    return result


def test_flags_alone_give_each_stages_defaults(captured, tmp_path):
    run("pretrain", str(tmp_path / "p"), str(tmp_path / "r"))
    run("finetune", str(tmp_path / "p"), str(tmp_path / "r"), "--tasks", "mortality,los", "--max-steps", "9")
    (_, pretrain), (_, finetune) = captured
    assert pretrain == EhrTrainSettings()  # lr 1e-3, 200 steps, budget 8192
    assert finetune == EhrTrainSettings(tasks=["mortality", "los"], train=TrainConfig(max_steps=9, lr=5e-4))


def test_the_file_gives_what_the_flags_leave_out(captured, tmp_path):
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "finetune.yaml"
    config.write_text(
        "model: lstm\ntoken_budget: 512\ninit: ../models/pretrained\nsizes: {d_model: 32}\n"
        "train: {max_steps: 7, warmup_steps: 2, seed: 4}\nlora: {rank: 4, alpha: 16}\n"
    )
    run("finetune", "p", "r", "--config", str(config), "--seed", "11", "--lora", "--lora-alpha", "8")
    (stage, settings) = captured[-1]
    assert stage == "finetune"
    assert settings == EhrTrainSettings(
        model="lstm",
        sizes={"d_model": 32},
        init=str(tmp_path / "models" / "pretrained"),  # beside the file, not the working directory
        token_budget=512,
        lora=LoraSettings(rank=4, alpha=8.0),  # the flag given over the file's; the rank the file's
        train=TrainConfig(max_steps=7, warmup_steps=2, seed=11, lr=5e-4),  # finetuning's rate under the file
    )
    run("finetune", "p", "r", "--config", str(config), "--no-lora", "--lr", "0.01")
    settings = captured[-1][1]
    assert settings.lora is None and settings.train.lr == 0.01 and settings.train.max_steps == 7


def test_python_reads_the_same_settings(tmp_path):
    config = tmp_path / "pretrain.yaml"
    config.write_text("train: {max_steps: 3}\nsizes: {n_layer: 2}\n")
    settings = EhrTrainSettings.read(config, {"train.bf16": True}, stage="pretrain")
    assert settings == EhrTrainSettings(sizes={"n_layer": 2}, train=TrainConfig(max_steps=3, bf16=True))
    assert EhrTrainSettings.read(None, None, stage="finetune").train.lr == 5e-4
    config.write_text("train: {lr: 0.02}\n")
    assert EhrTrainSettings.read(config, stage="finetune").train.lr == 0.02  # the file over the stage's default


def test_a_wrong_settings_file_is_one_line_exit_2(captured, tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("train: {max_step: 3}\n")
    result = runner.invoke(app, ["ehr", "pretrain", "p", "r", "--config", str(config)])
    assert result.exit_code == 2
    assert "max_step" in result.output and "bad.yaml" in result.output
    assert not captured
    with pytest.raises(MedstateError, match="stage must be"):
        EhrTrainSettings.read(None, None, stage="warmup")
