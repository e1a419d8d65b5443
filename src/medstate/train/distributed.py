"""torch.distributed, as torchrun starts it: one process per device, RANK / WORLD_SIZE / LOCAL_RANK in the
environment. `world()` joins the process group (gloo on CPU, nccl on CUDA) the first time it is asked; a plain
`python` or `medstate` run is a world of one and touches nothing.

Fully sharded data parallel is torch's FSDP2 (`fully_shard`): every element of every `nn.ModuleList` (a model's
residual blocks) becomes a unit whose weights are gathered just before its forward and backward and freed after,
and the root holds the rest (embeddings, head, final norm). Parameters, gradients, optimizer and EMA state are
then DTensors sharded over the processes; `gathered` makes the whole weights visible for evaluation and saving,
and `full_tensor` / `sharded_like` convert saved state, which is always whole, to and from the shards."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """This process's device: its GPU under torchrun on a CUDA machine, else the CPU."""
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def world() -> World:
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over all processes (float64, so token counts stay exact)."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shard_fully(root: nn.Module) -> nn.Module:
    """Apply FSDP2 in place: each element of every `nn.ModuleList` under `root`, innermost first, then `root`."""
    from torch.distributed.fsdp import fully_shard

    units = [child for module in root.modules() if isinstance(module, nn.ModuleList) for child in module]
    for unit in reversed(units):
        fully_shard(unit)
    return fully_shard(root)


@contextlib.contextmanager
def gathered(root: nn.Module) -> Iterator[None]:
    """Within the block, the modules FSDP2 sharded under `root` hold their whole weights as plain tensors
    (collective: every process enters). A unit that runs a forward inside frees its weights again after it."""
    from torch.distributed.fsdp import FSDPModule

    units = [module for module in root.modules() if isinstance(module, FSDPModule)]
    for unit in units:
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor shard (collective), or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`whole` cut the way `reference` is sharded over the processes (itself where `reference` is not a DTensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return whole
    return distribute_tensor(whole.to(reference.device), reference.device_mesh, reference.placements)
