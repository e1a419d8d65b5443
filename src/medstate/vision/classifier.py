"""Vision Mamba classifier (Vim-style): [convolutional stem →] patch embedding → learned position embedding → Vision
Mamba blocks → norm → mean over tokens → linear head. 2D images or 3D volumes; any input whose size is a multiple of
the patch (position embeddings are interpolated when the grid differs from the configured one).

The optional stem (`stem_channels`, 3×3 convolution + BatchNorm + GELU per entry, at full resolution) gives every
token local 2D/3D features before the 1-D scan. Without it a grey-scale 2×2 patch is a 4-number token, vertical
neighbours are a row of tokens apart in the sequence, and on MedMNIST the model learns several times more slowly
(docs/results/imaging.md)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from medstate.errors import MedstateError
from medstate.ssm.modules import RMSNorm
from medstate.vision.blocks import NORMS, MixerSpec, VisionMambaStack, conv_nd
from medstate.vision.scans import tokens_of


@dataclass
class ClassifierConfig:
    num_classes: int
    in_channels: int = 1
    image_size: list[int] = field(default_factory=lambda: [28, 28])
    patch_size: int = 2
    dim: int = 96
    depth: int = 4
    mixer: MixerSpec = field(default_factory=MixerSpec)
    stem_channels: list[int] = field(default_factory=list)  # [] = the plain patch embedding (Vim)

    def __post_init__(self) -> None:
        if len(self.image_size) not in (2, 3):
            raise MedstateError(f"image_size must have 2 or 3 sizes, got {self.image_size}")
        if any(s % self.patch_size for s in self.image_size):
            raise MedstateError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if any(c < 1 for c in self.stem_channels):
            raise MedstateError(f"stem_channels must be positive, got {self.stem_channels}")

    @property
    def spatial_dims(self) -> int:
        return len(self.image_size)


def grid_of(size: tuple[int, ...], patch: int) -> tuple[int, ...]:
    if any(s % patch for s in size):
        raise MedstateError(f"input size {tuple(size)} is not a multiple of the patch size {patch}")
    return tuple(s // patch for s in size)


def conv_stem(spatial_dims: int, inputs: int, channels: list[int]) -> nn.Sequential:
    """3×3(×3) convolution + BatchNorm + GELU for each entry of `channels`, resolution kept; empty = identity."""
    conv, norm = conv_nd(spatial_dims), NORMS["batch"][spatial_dims - 2]
    layers: list[nn.Module] = []
    for outputs in channels:
        layers += [conv(inputs, outputs, 3, padding=1, bias=False), norm(outputs), nn.GELU()]
        inputs = outputs
    return nn.Sequential(*layers)


class VisionMambaClassifier(nn.Module):
    def __init__(self, config: ClassifierConfig) -> None:
        super().__init__()
        self.config = config
        dims = config.spatial_dims
        self.stem = conv_stem(dims, config.in_channels, config.stem_channels)
        stem_out = config.stem_channels[-1] if config.stem_channels else config.in_channels
        self.patch_embed = conv_nd(dims)(stem_out, config.dim, config.patch_size, stride=config.patch_size)
        self.grid = grid_of(tuple(config.image_size), config.patch_size)
        self.position = nn.Parameter(torch.zeros(1, config.dim, *self.grid))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.blocks = VisionMambaStack(config.dim, config.depth, config.mixer, dims)
        self.norm = RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.num_classes)

    def _position(self, grid: tuple[int, ...]) -> torch.Tensor:
        if grid == self.grid:
            return self.position
        mode = "bilinear" if len(grid) == 2 else "trilinear"
        return F.interpolate(self.position, size=grid, mode=mode, align_corners=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[B, C, *S] → pooled features [B, dim]."""
        grid = grid_of(tuple(images.shape[2:]), self.config.patch_size)
        embedded = self.patch_embed(self.stem(images)) + self._position(grid)
        tokens = self.blocks(tokens_of(embedded), grid)
        return self.norm(tokens).mean(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
