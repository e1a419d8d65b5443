"""The one settings mechanism (`load_settings`): a file plus dotted typed overrides, paths beside the file."""

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from medstate.errors import MedstateError
from medstate.eval.metrics import format_interval
from medstate.loading import PATH, load_settings


@dataclass
class Source:
    name: str
    path: str = field(metadata=PATH)


@dataclass
class Train:
    max_steps: int = 10
    lr: float = 1e-3


@dataclass
class Settings:
    sources: list[Source]
    init: str | None = field(default=None, metadata=PATH)
    label: str = "x"  # not a path: kept as written
    train: Train = field(default_factory=Train)


def test_file_paths_beside_the_file_override_paths_from_the_working_directory(tmp_path, monkeypatch):
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "run.yaml").write_text(
        "sources: [{name: a, path: data/a.jsonl}, {name: b, path: /abs/b.jsonl}]\n"
        "init: ../models/m\nlabel: rel/x\ntrain: {lr: 0.5}\n"
    )
    monkeypatch.chdir(tmp_path)
    settings = load_settings(Settings, folder / "run.yaml", {"train.max_steps": 3, "train.seed": None})
    assert [s.path for s in settings.sources] == [str(folder / "data/a.jsonl"), "/abs/b.jsonl"]
    assert settings.init == str(tmp_path / "models/m")
    assert settings.label == "rel/x"
    assert settings.train == Train(max_steps=3, lr=0.5)  # the override joins the file's train mapping

    overridden = load_settings(Settings, folder / "run.yaml", {"init": Path("elsewhere/m")})
    assert overridden.init == str(tmp_path / "elsewhere/m")  # against the working directory, not the file


def test_no_file_gives_the_defaults_with_the_overrides():
    settings = load_settings(Settings, None, {"sources": [], "train.lr": 2})
    assert settings == Settings(sources=[], train=Train(lr=2.0))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"sources": [], "train.max_step": 3}, r"train: unknown key\(s\) max_step"),
        ({"sources": [], "train.max_steps": "many"}, "train: max_steps must be an integer"),
        ({}, r"missing key\(s\) sources"),
    ],
)
def test_a_wrong_override_or_a_missing_key_is_one_named_error(overrides, message):
    with pytest.raises(MedstateError, match=message):
        load_settings(Settings, None, overrides, "options")


def test_a_file_that_is_not_a_mapping_names_itself(tmp_path):
    (tmp_path / "bad.yaml").write_text("- just\n- a list\n")
    with pytest.raises(MedstateError, match=r"bad\.yaml must be a mapping"):
        load_settings(Settings, tmp_path / "bad.yaml")


def test_format_interval():
    assert format_interval({"value": 0.81234, "low": 0.7, "high": 0.9}) == "0.812 [0.700, 0.900]"
    assert format_interval({"value": 0.5, "low": 0.25, "high": 0.75}, 100, 1) == "50.0 [25.0, 75.0]"
    assert format_interval({"value": 0.5, "low": None}) == "0.500"
    assert format_interval({"value": None, "status": "undefined: one class"}) == "undefined: one class"
    assert format_interval({"value": None, "status": "x"}, undefined="undefined") == "undefined"
