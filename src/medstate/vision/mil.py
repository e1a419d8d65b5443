"""MambaMIL-style aggregator for bags of instance features (whole-slide patches embedded by any frozen encoder):
a linear projection, Vision Mamba blocks over the bag read as a 1-D sequence (by default the original order and a
strided reordering, MambaMIL's two routes), then gated attention pooling (Ilse et al. 2018) and a linear head.

The order of a bag matters to a sequence model. When the instances' coordinates are given, the bag is first put in
raster order of the coordinates (row, then column), so the result does not depend on the order in which the patches
were listed; without coordinates the listed order is the sequence order."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from medstate.ssm.modules import RMSNorm
from medstate.vision.blocks import MixerSpec, VisionMambaStack


@dataclass
class MILConfig:
    num_classes: int
    in_features: int = 1024
    dim: int = 128
    depth: int = 2
    attention_dim: int = 128
    dropout: float = 0.0
    mixer: MixerSpec = field(default_factory=lambda: MixerSpec(scan="strided", stride=8))


@dataclass
class BagPredictions:
    """A split's bag predictions: class probabilities and each bag's attention over its instances."""

    probabilities: np.ndarray  # [bags, classes]
    attention: list[np.ndarray]  # each [instances], in the bag's listed order, summing to 1


def coordinate_order(coords: torch.Tensor) -> torch.Tensor:
    """[B, N, k] integer (or integral) coordinates → [B, N] indices that sort each bag lexicographically."""
    order = torch.arange(coords.shape[1], device=coords.device).expand(coords.shape[:2])
    for axis in range(coords.shape[2] - 1, -1, -1):  # stable sorts, least significant axis first
        keys = coords.gather(1, order.unsqueeze(-1).expand(-1, -1, coords.shape[2]))[..., axis]
        order = order.gather(1, torch.sort(keys, dim=1, stable=True).indices)
    return order


class MambaMIL(nn.Module):
    def __init__(self, config: MILConfig) -> None:
        super().__init__()
        self.config = config
        self.project = nn.Sequential(nn.Linear(config.in_features, config.dim), nn.GELU(), nn.Dropout(config.dropout))
        self.blocks = VisionMambaStack(config.dim, config.depth, config.mixer, spatial_dims=1)
        self.norm = RMSNorm(config.dim)
        self.attention_value = nn.Linear(config.dim, config.attention_dim)
        self.attention_gate = nn.Linear(config.dim, config.attention_dim)
        self.attention_score = nn.Linear(config.attention_dim, 1)
        self.head = nn.Linear(config.dim, config.num_classes)

    def forward(self, bags: torch.Tensor, coords: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """bags [B, N, F] (, coords [B, N, k]) → (logits [B, classes], attention [B, N] in the input's order)."""
        order = None
        if coords is not None:
            order = coordinate_order(coords)
            bags = bags.gather(1, order.unsqueeze(-1).expand_as(bags))
        tokens = self.norm(self.blocks(self.project(bags), (bags.shape[1],)))
        gated = torch.tanh(self.attention_value(tokens)) * torch.sigmoid(self.attention_gate(tokens))
        attention = torch.softmax(self.attention_score(gated).squeeze(-1), dim=1)
        logits = self.head(torch.einsum("bn,bnc->bc", attention, tokens))
        if order is not None:
            attention = torch.empty_like(attention).scatter_(1, order, attention)
        return logits, attention
