"""A vision run's settings, one YAML (data, model, train), read by the one strict loader (`load_settings`'s
mechanism: the data path beside the file, dotted typed overrides such as `{"train.seed": 1}`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medstate.errors import MedstateError
from medstate.loading import PATH, expect_mapping, from_data, settings_data
from medstate.vision.models import model_spec


@dataclass
class DataConfig:
    path: str = field(metadata=PATH)
    format: str = "folder"  # medmnist | folder | bags
    foreground_only: bool = False  # segmentation: every non-zero label is class 1 (instance masks)
    normalize: str = "unit"  # unit: as read (MedMNIST: /255); zscore: per image and channel

    def __post_init__(self) -> None:
        if self.format not in ("medmnist", "folder", "bags"):
            raise MedstateError(f"data.format must be medmnist, folder or bags, got {self.format!r}")
        if self.normalize not in ("unit", "zscore"):
            raise MedstateError(f"data.normalize must be unit or zscore, got {self.normalize!r}")


@dataclass
class TrainConfig:
    epochs: int = 100  # classification
    steps: int = 500  # segmentation (patches)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training; lr x 0.1 at each
    seed: int = 0
    patch_size: list[int] = field(default_factory=lambda: [64, 64])
    foreground_fraction: float = 0.33
    sw_overlap: float = 0.5
    bootstrap: int = 1000
    threads: int | None = None


@dataclass
class RunConfig:
    data: DataConfig
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)


def run_config(data: Any, where: str) -> RunConfig:
    data = dict(expect_mapping(data, where))
    if "model" not in data:
        raise MedstateError(f"{where}: missing key model")
    spec = model_spec(data.pop("model"), f"{where}: model")
    config = from_data(RunConfig, {**data, "model": {}}, where)
    config.model = spec
    if (spec.task == "bags") != (config.data.format == "bags"):
        raise MedstateError(f"{where}: data.format bags goes with model kind mil, and only with it")
    if spec.task == "bags" and config.data.normalize != "unit":
        raise MedstateError(f"{where}: data.normalize applies to images; bags are read as stored")
    return config


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """A run YAML (its data path relative to its folder) with typed overrides (`load_settings`'s dotted keys:
    `{"train.seed": 1}`)."""
    return run_config(settings_data(RunConfig, path, overrides, "vision run config"), f"vision run config {path}")


def config_dict(config: RunConfig) -> dict:
    return {
        "data": dataclasses.asdict(config.data),
        "model": config.model.to_dict(),
        "train": dataclasses.asdict(config.train),
    }
