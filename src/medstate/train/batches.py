"""Where a training loop's batches come from: the `BatchStream` protocol (the next batch, its position as a
`state_dict`, a share of each global batch per process) and `EpochBatches`, a stream over per-epoch lists whose
order depends only on the seed and the epoch."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from medstate.errors import MedstateError


class BatchStream(Protocol):
    def __next__(self) -> Any: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def shard(self, rank: int, world: int) -> None:
        """From now on, give process `rank` of `world` its part of each global batch."""


class EpochBatches:
    """A `BatchStream` over `batches(epoch)` lists. The position (epoch, index) counts batches of the whole list;
    with several processes, process r takes batches index + r of each group of `world` (an epoch's last, incomplete
    group is left out so that every process takes as many steps)."""

    def __init__(self, batches: Callable[[int], list]):
        self.batches, self.epoch, self.index = batches, 0, 0
        self.rank, self.world = 0, 1
        self._current: list | None = None

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __next__(self) -> Any:
        if self._current is None:
            self._current = self.batches(self.epoch)
            if len(self._current) < self.world:
                raise MedstateError(f"{len(self._current)} training batches cannot feed {self.world} processes")
        if self.index + self.world > len(self._current):
            self.epoch, self.index, self._current = self.epoch + 1, 0, None
            return next(self)
        batch = self._current[self.index + self.rank]
        self.index += self.world
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._current = state["epoch"], state["index"], None
