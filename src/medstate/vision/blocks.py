"""Vision Mamba blocks: tokens [B, N, C] of a spatial shape → scan → one medstate mixer for every route →
routes back in raster order → merge → residual, then an optional MLP. The mixer is the engine's Mamba-1 or
Mamba-2 layer, so the CUDA kernels are used on GPU tensors when installed and the PyTorch path elsewhere, with the
same routes either way."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from medstate.errors import MedstateError
from medstate.ssm.config import SSMConfig
from medstate.ssm.modules import Mamba1Mixer, Mamba2Mixer, RMSNorm
from medstate.vision.scans import RouteMerge, Scan, route_orders

NORMS = {"instance": (nn.InstanceNorm2d, nn.InstanceNorm3d), "batch": (nn.BatchNorm2d, nn.BatchNorm3d)}


@dataclass
class MixerSpec:
    """The Mamba layer inside each vision block (plain data)."""

    version: int = 2
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    head_dim: int = 64  # Mamba-2 (capped at the inner width)
    scan: str = "bidirectional"
    stride: int = 4  # `strided` scans
    merge: str = "mean"
    # "shared": one mixer reads every route (batched); "separate": a mixer per route (as Vim's two directions)
    route_weights: str = "shared"
    mlp_ratio: float = 0.0

    def __post_init__(self) -> None:
        Scan(self.scan, self.stride)  # validates the kind
        if self.route_weights not in ("shared", "separate"):
            raise MedstateError(f"route_weights must be 'shared' or 'separate', got {self.route_weights!r}")

    def ssm_config(self, dim: int) -> SSMConfig:
        return SSMConfig(
            version=self.version,
            d_model=dim,
            n_layer=1,
            d_state=self.d_state,
            expand=self.expand,
            d_conv=self.d_conv,
            head_dim=min(self.head_dim, self.expand * dim),
            vocab_size=1,
        )


def _mixer(spec: MixerSpec, dim: int) -> nn.Module:
    config = spec.ssm_config(dim)
    return (Mamba1Mixer if config.version == 1 else Mamba2Mixer)(config)


class VisionMambaBlock(nn.Module):
    def __init__(self, dim: int, spec: MixerSpec, spatial_dims: int) -> None:
        super().__init__()
        self.scan = Scan(spec.scan, spec.stride)
        routes = route_orders(spec.scan, (2,) * spatial_dims, spec.stride).shape[0]
        self.routes = routes
        self.norm = RMSNorm(dim)
        count = routes if spec.route_weights == "separate" else 1
        self.mixers = nn.ModuleList(_mixer(spec, dim) for _ in range(count))
        self.merge = RouteMerge(spec.merge, routes, dim)
        hidden = round(dim * spec.mlp_ratio)
        self.mlp = None
        if hidden:
            self.mlp_norm = RMSNorm(dim)
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def mix_routes(self, tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[B, N, C] → every route's mixer output back in raster order, [B, R, N, C] (before merging)."""
        sequences = self.scan.to_sequences(tokens, shape)  # [B * R, N, C]
        if len(self.mixers) == 1:
            mixed = self.mixers[0](sequences, norm=self.norm)[0]
        else:
            by_route = sequences.unflatten(0, (-1, self.routes))
            parts = [mixer(by_route[:, r], norm=self.norm)[0] for r, mixer in enumerate(self.mixers)]
            mixed = torch.stack(parts, dim=1).flatten(0, 1)
        return self.scan.from_sequences(mixed, shape)

    def forward(self, tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        tokens = tokens + self.merge(self.mix_routes(tokens, shape))
        if self.mlp is not None:
            tokens = tokens + self.mlp(self.mlp_norm(tokens))
        return tokens


class VisionMambaStack(nn.Module):
    """`depth` blocks over tokens [B, N, C] of one spatial shape."""

    def __init__(self, dim: int, depth: int, spec: MixerSpec, spatial_dims: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(VisionMambaBlock(dim, spec, spatial_dims) for _ in range(depth))

    def forward(self, tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        for block in self.blocks:
            tokens = block(tokens, shape)
        return tokens


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in (2, 3):
        raise MedstateError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d
