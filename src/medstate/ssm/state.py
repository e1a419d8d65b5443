"""The recurrent state of a Mamba model: everything needed to continue a sequence, per layer.

For each layer i:
  conv[i]  [batch, conv_channels, d_conv - 1]  the last d_conv - 1 inputs of the causal convolution
                                               (Mamba-1: d_inner channels; Mamba-2: d_inner + 2 * n_groups * d_state)
  ssm[i]   Mamba-1: [batch, d_inner, d_state]; Mamba-2: [batch, n_heads, head_dim, d_state], float32

Its size does not depend on how many tokens were consumed: this is what makes per-patient state cheap to keep.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from medstate.errors import MedstateError

_FORMAT = "medstate.ssm.state/1"


@dataclass
class SSMState:
    conv: list[torch.Tensor]
    ssm: list[torch.Tensor]

    def __post_init__(self) -> None:
        if len(self.conv) != len(self.ssm):
            raise ValueError("conv and ssm must have one entry per layer")

    @property
    def n_layers(self) -> int:
        return len(self.ssm)

    @property
    def batch_size(self) -> int:
        return self.ssm[0].shape[0]

    @property
    def device(self) -> torch.device:
        return self.ssm[0].device

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SSMState:
        """Move to a device; `dtype` applies to the conv windows only (the SSM state stays float32)."""
        return SSMState([c.to(device=device, dtype=dtype) for c in self.conv], [s.to(device=device) for s in self.ssm])

    def clone(self) -> SSMState:
        return SSMState([c.clone() for c in self.conv], [s.clone() for s in self.ssm])

    def detach(self) -> SSMState:
        return SSMState([c.detach() for c in self.conv], [s.detach() for s in self.ssm])

    def select(self, index: torch.Tensor | Sequence[int]) -> SSMState:
        """Rows of the batch, in the given order (e.g. to drop finished sequences or reorder patients)."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        return SSMState([c.index_select(0, index) for c in self.conv], [s.index_select(0, index) for s in self.ssm])

    def split(self, sizes: int | Sequence[int] = 1) -> list[SSMState]:
        """Split along the batch (default: one state per row)."""
        convs = [c.split(sizes) for c in self.conv]
        ssms = [s.split(sizes) for s in self.ssm]
        return [SSMState([c[i] for c in convs], [s[i] for s in ssms]) for i in range(len(ssms[0]))]

    @staticmethod
    def cat(states: Sequence[SSMState]) -> SSMState:
        """Concatenate states along the batch (e.g. stack several patients' states to step them together)."""
        if not states:
            raise ValueError("SSMState.cat needs at least one state")
        layers = states[0].n_layers
        return SSMState(
            [torch.cat([s.conv[i] for s in states]) for i in range(layers)],
            [torch.cat([s.ssm[i] for s in states]) for i in range(layers)],
        )

    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"conv.{i}": c.contiguous().cpu() for i, c in enumerate(self.conv)}
        tensors.update({f"ssm.{i}": s.contiguous().cpu() for i, s in enumerate(self.ssm)})
        return tensors

    def save(self, path: str | Path) -> None:
        save_file(self._tensors(), str(path), metadata={"format": _FORMAT, "n_layers": json.dumps(self.n_layers)})

    def to_bytes(self) -> bytes:
        """The state as safetensors bytes (for a database column)."""
        from safetensors.torch import save

        return save(self._tensors(), metadata={"format": _FORMAT, "n_layers": json.dumps(self.n_layers)})

    @classmethod
    def from_bytes(cls, data: bytes, device: torch.device | str = "cpu") -> SSMState:
        from safetensors.torch import load

        return cls._from_tensors({k: v.to(device) for k, v in load(data).items()}, "state bytes")

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> SSMState:
        path = Path(path)
        if not path.is_file():
            raise MedstateError(f"state file {path} does not exist")
        return cls._from_tensors(load_file(str(path), device=str(device)), str(path))

    @classmethod
    def _from_tensors(cls, tensors: dict[str, torch.Tensor], where: str) -> SSMState:
        layers = sum(1 for k in tensors if k.startswith("ssm."))
        try:
            return cls([tensors[f"conv.{i}"] for i in range(layers)], [tensors[f"ssm.{i}"] for i in range(layers)])
        except KeyError as missing:
            raise MedstateError(f"{where} is not a medstate SSM state (missing {missing})") from None
