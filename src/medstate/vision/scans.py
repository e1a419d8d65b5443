"""Scans: how an image, a volume or a bag of instances becomes 1-D sequences for a Mamba mixer, and back.

Tokens stay in one canonical layout between blocks, `[B, N, C]` in raster order (row-major over the spatial shape,
the last axis fastest). A scan is a fixed set of *routes*; each route is a permutation of the N positions. Reading a
route gathers the tokens in that order, so `to_sequences` gives `[B * R, N, C]` (routes batched as extra rows, one
mixer call for all of them); `from_sequences` puts every route's outputs back in raster order, `[B, R, N, C]`, by the
inverse permutation. Both are pure index moves, so `from_sequences(to_sequences(x))` returns every route's copy of x
bitwise, for any shape (odd, non-square, non-cubic, 1-D bags). How the routes are combined afterwards is a separate,
explicit choice (`RouteMerge`: sum, mean or learned weights). No route is ever skipped, on any device: the routes are
data, not code paths.

Kinds (for spatial shapes of 1, 2 or 3 axes):
- `raster`: one route, row-major.
- `bidirectional` (Vision Mamba): raster and its reverse.
- `cross` (VMamba's SS2D cross-scan): for each axis as the fastest one (row-major and column-major in 2D; three
  rotations in 3D), the order and its reverse. In 2D these are VMamba's four routes: rows, columns, rows reversed,
  columns reversed.
- `tri` (SegMamba's tri-oriented Mamba): raster, raster reversed, and the inter-slice order (the first axis fastest:
  each in-plane position visits every slice before moving on).
- `strided` (MambaMIL's sequence reordering): raster and the order 0, s, 2s, …, 1, 1 + s, … for a stride s.
- `zigzag`: one locality-preserving route (boustrophedon): consecutive positions are always neighbours; each line
  turns back at the end and each plane starts where the previous one ended.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import nn

from medstate.errors import MedstateError

SCAN_KINDS = ("raster", "bidirectional", "cross", "tri", "strided", "zigzag")
MERGES = ("sum", "mean", "learned")


def _raster_with_fast_axes(shape: tuple[int, ...], axes: tuple[int, ...]) -> torch.Tensor:
    """Raster positions visited with the axes nested in the order `axes` (the last one fastest)."""
    grid = torch.arange(math.prod(shape)).reshape(shape)
    return grid.permute(axes).reshape(-1)


def _zigzag(shape: tuple[int, ...]) -> torch.Tensor:
    """Boustrophedon order: every other sub-block along the first axis is visited backwards."""
    if len(shape) == 1:
        return torch.arange(shape[0])
    inner = _zigzag(shape[1:])
    size = math.prod(shape[1:])
    parts = [(inner if i % 2 == 0 else inner.flip(0)) + i * size for i in range(shape[0])]
    return torch.cat(parts)


def _strided(n: int, stride: int) -> torch.Tensor:
    return torch.cat([torch.arange(start, n, stride) for start in range(min(stride, n))])


@functools.lru_cache(maxsize=256)
def route_orders(kind: str, shape: tuple[int, ...], stride: int = 4) -> torch.Tensor:
    """[R, N] int64: row r lists the raster positions in the order route r visits them."""
    if kind not in SCAN_KINDS:
        raise MedstateError(f"unknown scan {kind!r}; choose one of {', '.join(SCAN_KINDS)}")
    if not 1 <= len(shape) <= 3 or min(shape) < 1:
        raise MedstateError(f"a scan needs 1 to 3 positive sizes, got shape {tuple(shape)}")
    n = math.prod(shape)
    raster = torch.arange(n)
    dims = len(shape)
    if kind == "raster":
        routes = [raster]
    elif kind == "bidirectional":
        routes = [raster, raster.flip(0)]
    elif kind == "cross":
        # axis k fastest for k = last, ..., first: rotations of the axis order
        orders = [_raster_with_fast_axes(shape, tuple((k + 1 + i) % dims for i in range(dims))) for k in range(dims)]
        orders = orders[-1:] + orders[:-1]  # raster (last axis fastest) first
        routes = orders + [o.flip(0) for o in orders]
    elif kind == "tri":
        inter_slice = _raster_with_fast_axes(shape, (*range(1, dims), 0))
        routes = [raster, raster.flip(0), inter_slice]
    elif kind == "strided":
        if stride < 1:
            raise MedstateError(f"scan stride must be at least 1, got {stride}")
        routes = [raster, _strided(n, stride)]
    else:
        routes = [_zigzag(tuple(shape))]
    return torch.stack(routes)


@functools.lru_cache(maxsize=256)
def _inverse_orders(kind: str, shape: tuple[int, ...], stride: int) -> torch.Tensor:
    return torch.argsort(route_orders(kind, shape, stride), dim=1)


@dataclass(frozen=True)
class Scan:
    """A scan kind (and stride, for `strided`) applied to token tensors [B, N, C] of a given spatial shape."""

    kind: str = "bidirectional"
    stride: int = 4

    def __post_init__(self) -> None:
        if self.kind not in SCAN_KINDS:
            raise MedstateError(f"unknown scan {self.kind!r}; choose one of {', '.join(SCAN_KINDS)}")

    def routes(self, shape: tuple[int, ...]) -> int:
        return route_orders(self.kind, tuple(shape), self.stride).shape[0]

    def to_sequences(self, tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[B, N, C] in raster order → [B * R, N, C], row b * R + r is route r of item b."""
        batch, n, channels = tokens.shape
        orders = route_orders(self.kind, tuple(shape), self.stride).to(tokens.device)
        if orders.shape[1] != n:
            raise MedstateError(f"{n} tokens do not fill the spatial shape {tuple(shape)}")
        return tokens.index_select(1, orders.reshape(-1)).reshape(batch * orders.shape[0], n, channels)

    def from_sequences(self, sequences: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """[B * R, N, C] (as `to_sequences` laid them out) → [B, R, N, C], every route back in raster order."""
        inverse = _inverse_orders(self.kind, tuple(shape), self.stride).to(sequences.device)
        routes, n = inverse.shape
        channels = sequences.shape[-1]
        grouped = sequences.reshape(-1, routes, n, channels)
        index = inverse[None, :, :, None].expand(grouped.shape[0], routes, n, channels)
        return grouped.gather(2, index)


class RouteMerge(nn.Module):
    """Combines the routes [B, R, N, C] → [B, N, C]: `sum`, `mean`, or `learned` per-route, per-channel weights
    (initialised to the mean)."""

    def __init__(self, mode: str, routes: int, channels: int) -> None:
        super().__init__()
        if mode not in MERGES:
            raise MedstateError(f"unknown route merge {mode!r}; choose one of {', '.join(MERGES)}")
        self.mode = mode
        self.weight = nn.Parameter(torch.full((routes, channels), 1.0 / routes)) if mode == "learned" else None

    def forward(self, routed: torch.Tensor) -> torch.Tensor:
        if self.mode == "sum":
            return routed.sum(1)
        if self.mode == "mean":
            return routed.mean(1)
        return (routed * self.weight[:, None, :]).sum(1)


def tokens_of(feature_map: torch.Tensor) -> torch.Tensor:
    """[B, C, *S] → [B, N, C] in raster order."""
    return feature_map.flatten(2).transpose(1, 2)


def feature_map_of(tokens: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """[B, N, C] in raster order → [B, C, *S]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *shape)
