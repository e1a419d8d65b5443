"""U-Mamba-style segmentation network, 2D and 3D: an nnU-Net-like CNN encoder–decoder (stages of convolution →
instance norm → leaky ReLU, strided downsampling, transposed-convolution upsampling with skip connections) with
Vision Mamba blocks after the convolutions of the deeper encoder stages (`mamba_stages`), where the feature map is
small enough for long-range mixing to be cheap. Without Mamba stages it is the same-size CNN U-Net.

The constructor's keywords are nnU-Net v2's (`features_per_stage`, `kernel_sizes`, `strides`, …) so the class can be
named in an nnU-Net plan (`medstate.vision.nnunet`); the decoder's `deep_supervision` switch is where nnU-Net's
trainer expects it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from medstate.errors import MedstateError
from medstate.vision.blocks import NORMS, MixerSpec, VisionMambaStack, conv_nd
from medstate.vision.scans import feature_map_of, tokens_of

Size = int | list[int]
NONLINS = {"leakyrelu": lambda: nn.LeakyReLU(0.01, inplace=True), "relu": lambda: nn.ReLU(inplace=True)}


@dataclass
class SegmenterConfig:
    num_classes: int  # including background
    in_channels: int = 1
    spatial_dims: int = 2
    features_per_stage: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    strides: list[Size] = field(default_factory=lambda: [1, 2, 2, 2])
    kernel_sizes: list[Size] = field(default_factory=lambda: [3, 3, 3, 3])
    n_conv_per_stage: int | list[int] = 2  # one count, or one per stage
    n_conv_per_stage_decoder: int | list[int] = 2  # one count, or one per decoder stage (stages - 1)
    norm: str = "instance"  # instance | batch
    nonlin: str = "leakyrelu"  # leakyrelu (slope 0.01) | relu
    mamba_stages: list[int] = field(default_factory=lambda: [2, 3])  # encoder stages followed by Mamba blocks
    mamba_depth: int = 1
    mixer: MixerSpec = field(default_factory=lambda: MixerSpec(scan="bidirectional"))
    deep_supervision: bool = False

    def __post_init__(self) -> None:
        stages = len(self.features_per_stage)
        if self.spatial_dims not in (2, 3):
            raise MedstateError(f"spatial_dims must be 2 or 3, got {self.spatial_dims}")
        for name in ("strides", "kernel_sizes"):
            if len(getattr(self, name)) != stages:
                raise MedstateError(f"{name} needs one entry per stage ({stages}), got {len(getattr(self, name))}")
        for name, expected in (("n_conv_per_stage", stages), ("n_conv_per_stage_decoder", stages - 1)):
            value = getattr(self, name)
            if isinstance(value, list) and len(value) != expected:
                raise MedstateError(f"{name} needs {expected} counts, got {len(value)}")
        if self.norm not in NORMS:
            raise MedstateError(f"norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.nonlin not in NONLINS:
            raise MedstateError(f"nonlin must be one of {', '.join(NONLINS)}, got {self.nonlin!r}")
        wrong = [s for s in self.mamba_stages if not 0 <= s < stages]
        if wrong:
            raise MedstateError(f"mamba_stages {wrong} are not stages of a {stages}-stage network")

    def per_axis(self, value: Size) -> tuple[int, ...]:
        if isinstance(value, int):
            return (value,) * self.spatial_dims
        if len(value) != self.spatial_dims:
            raise MedstateError(f"{value} does not give one size per axis ({self.spatial_dims})")
        return tuple(value)

    def convs(self, decoder: bool, stage: int) -> int:
        value = self.n_conv_per_stage_decoder if decoder else self.n_conv_per_stage
        return value if isinstance(value, int) else value[stage]

    def divisor(self) -> tuple[int, ...]:
        """Each input size must be a multiple of this (the product of the strides per axis)."""
        return tuple(math.prod(axis) for axis in zip(*(self.per_axis(s) for s in self.strides)))


def _conv_layers(config: SegmenterConfig, inputs: int, outputs: int, count: int, kernel: Size, stride: Size):
    conv = conv_nd(config.spatial_dims)
    norm = NORMS[config.norm][config.spatial_dims - 2]
    kernel = config.per_axis(kernel)
    layers = []
    for i in range(count):
        step = config.per_axis(stride) if i == 0 else 1
        layers += [
            conv(inputs if i == 0 else outputs, outputs, kernel, step, tuple(k // 2 for k in kernel)),
            norm(outputs, affine=True),
            NONLINS[config.nonlin](),
        ]
    return nn.Sequential(*layers)


class EncoderStage(nn.Module):
    def __init__(self, config: SegmenterConfig, index: int, inputs: int) -> None:
        super().__init__()
        outputs = config.features_per_stage[index]
        count = config.convs(False, index)
        self.convs = _conv_layers(config, inputs, outputs, count, config.kernel_sizes[index], config.strides[index])
        self.mamba = None
        if index in config.mamba_stages:
            self.mamba = VisionMambaStack(outputs, config.mamba_depth, config.mixer, config.spatial_dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.convs(x)
        if self.mamba is not None:
            shape = tuple(x.shape[2:])
            x = feature_map_of(self.mamba(tokens_of(x), shape), shape)
        return x


class Decoder(nn.Module):
    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.deep_supervision = config.deep_supervision
        transposed = nn.ConvTranspose2d if config.spatial_dims == 2 else nn.ConvTranspose3d
        head = conv_nd(config.spatial_dims)
        features = config.features_per_stage
        self.ups, self.stages, self.heads = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for s in range(len(features) - 1, 0, -1):
            stride = config.per_axis(config.strides[s])
            self.ups.append(transposed(features[s], features[s - 1], stride, stride))
            count = config.convs(True, len(features) - 1 - s)
            kernel = config.kernel_sizes[s - 1]
            self.stages.append(_conv_layers(config, 2 * features[s - 1], features[s - 1], count, kernel, 1))
            self.heads.append(head(features[s - 1], config.num_classes, 1))

    def forward(self, skips: list[torch.Tensor]) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        for i, (up, stage, head) in enumerate(zip(self.ups, self.stages, self.heads)):
            x = stage(torch.cat([up(x), skips[-(i + 2)]], dim=1))
            if self.deep_supervision or i == len(self.stages) - 1:
                outputs.append(head(x))
        # nnU-Net's order: the full resolution first
        return outputs[::-1] if self.deep_supervision else outputs[-1]


class UMambaSegmenter(nn.Module):
    def __init__(self, config: SegmenterConfig) -> None:
        super().__init__()
        self.config = config
        inputs, stages = config.in_channels, []
        for i, features in enumerate(config.features_per_stage):
            stages.append(EncoderStage(config, i, inputs))
            inputs = features
        self.encoder = nn.ModuleList(stages)
        self.decoder = Decoder(config)

    def forward(self, images: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        divisor = self.config.divisor()
        size = tuple(images.shape[2:])
        if len(size) != self.config.spatial_dims or any(s % d for s, d in zip(size, divisor)):
            raise MedstateError(f"input size {size} must be a multiple of {divisor} (the product of the strides)")
        skips, x = [], images
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        return self.decoder(skips)
