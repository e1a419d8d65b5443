"""Vision models by name, from plain data, and their checkpoints (a directory with config.json and
model.safetensors).

    kind            task            what
    vision-mamba    classification  medstate Vision Mamba classifier (2D/3D)
    resnet18        classification  ResNet-18, CIFAR stem (the MedMNIST baseline)
    umamba          segmentation    medstate U-Mamba-style net (2D/3D); `mamba_stages: []` is the same-size CNN U-Net
    unet            segmentation    MONAI UNet (baseline)
    swinunetr       segmentation    MONAI SwinUNETR (baseline)
    mil             bags            medstate MambaMIL aggregator
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from medstate.errors import MedstateError
from medstate.loading import expect_mapping, from_data, read_json
from medstate.ssm.modules import Mamba1Mixer, Mamba2Mixer
from medstate.ssm.ops import cuda
from medstate.vision import imaging_module
from medstate.vision.classifier import ClassifierConfig, VisionMambaClassifier
from medstate.vision.mil import MambaMIL, MILConfig
from medstate.vision.resnet import ResNet18, ResNetConfig
from medstate.vision.segmentation import SegmenterConfig, UMambaSegmenter


@dataclass
class MonaiUNetConfig:
    num_classes: int
    in_channels: int = 1
    spatial_dims: int = 2
    channels: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[int] = field(default_factory=lambda: [2, 2, 2])
    num_res_units: int = 2


@dataclass
class SwinUNETRConfig:
    num_classes: int
    in_channels: int = 1
    spatial_dims: int = 3
    feature_size: int = 24
    use_checkpoint: bool = False


def _monai_unet(config: MonaiUNetConfig) -> nn.Module:
    return imaging_module("monai.networks.nets").UNet(
        config.spatial_dims,
        config.in_channels,
        config.num_classes,
        config.channels,
        config.strides,
        num_res_units=config.num_res_units,
    )


def _swin_unetr(config: SwinUNETRConfig) -> nn.Module:
    imaging_module("einops")  # SwinUNETR needs it
    return imaging_module("monai.networks.nets").SwinUNETR(
        in_channels=config.in_channels,
        out_channels=config.num_classes,
        feature_size=config.feature_size,
        spatial_dims=config.spatial_dims,
        use_checkpoint=config.use_checkpoint,
    )


# kind → (config class, builder, task)
KINDS: dict[str, tuple[type, Any, str]] = {
    "vision-mamba": (ClassifierConfig, VisionMambaClassifier, "classification"),
    "resnet18": (ResNetConfig, ResNet18, "classification"),
    "umamba": (SegmenterConfig, UMambaSegmenter, "segmentation"),
    "unet": (MonaiUNetConfig, _monai_unet, "segmentation"),
    "swinunetr": (SwinUNETRConfig, _swin_unetr, "segmentation"),
    "mil": (MILConfig, MambaMIL, "bags"),
}


@dataclass
class ModelSpec:
    kind: str
    config: Any  # the kind's config dataclass

    @property
    def task(self) -> str:
        return KINDS[self.kind][2]

    def to_dict(self) -> dict:
        return {"kind": self.kind, **dataclasses.asdict(self.config)}


def model_spec(data: Any, where: str) -> ModelSpec:
    """`{kind: umamba, num_classes: 2, ...}` → ModelSpec, every key checked against the kind's config."""
    data = dict(expect_mapping(data, where))
    kind = data.pop("kind", None)
    if kind not in KINDS:
        raise MedstateError(f"{where}: kind must be one of {', '.join(KINDS)}, got {kind!r}")
    return ModelSpec(kind, from_data(KINDS[kind][0], data, f"{where} ({kind})"))


def build_model(spec: ModelSpec) -> nn.Module:
    return KINDS[spec.kind][1](spec.config)


def save_model(model: nn.Module, spec: ModelSpec, directory: str | Path, inference: dict | None = None) -> Path:
    """config.json (the spec, and how to feed the model: normalisation, patch size) + model.safetensors."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"medstate_vision": spec.to_dict(), "inference": inference or {}}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(weights, str(directory / "model.safetensors"))
    return directory


def load_model(directory: str | Path) -> tuple[nn.Module, ModelSpec, dict]:
    """(model in eval mode, its spec, its inference settings)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MedstateError(f"{directory} has no config.json; expected a medstate vision model directory")
    data = expect_mapping(read_json(config_path, "vision model config"), str(config_path))
    if "medstate_vision" not in data:
        raise MedstateError(f"{config_path} is not a medstate vision model (no 'medstate_vision' entry)")
    spec = model_spec(data["medstate_vision"], str(config_path))
    model = build_model(spec)
    try:
        weights = load_file(str(directory / "model.safetensors"))
    except (SafetensorError, OSError) as err:
        raise MedstateError(f"cannot read {directory / 'model.safetensors'}: {err}") from None
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise MedstateError(
            f"{directory}: weights do not fit the config (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    return model.eval(), spec, expect_mapping(data.get("inference", {}), f"{config_path}: inference")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def backend_of(model: nn.Module, device: torch.device) -> str:
    """Which scan implementation runs: the fused CUDA kernels or medstate's PyTorch path."""
    if not any(isinstance(m, (Mamba1Mixer, Mamba2Mixer)) for m in model.modules()):
        return "no Mamba layers"
    return "cuda-kernels" if device.type == "cuda" and cuda.kernels() is not None else "torch"


def require_kernels(model: nn.Module, device: torch.device) -> None:
    backend = backend_of(model, device)
    if backend == "torch":
        raise MedstateError(
            "--require-kernels: the fused kernels are not in use (needs a CUDA device and `pip install medstate[cuda]`)"
        )
