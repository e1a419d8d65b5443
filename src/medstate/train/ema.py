"""Exponential moving average of a model's weights (Polyak averaging): after each optimizer step
ema ← decay·ema + (1 − decay)·θ, kept in float32 whatever the model's dtype. `applied(model)` swaps the
average into the model for evaluation or saving and puts the trained weights back afterwards. Under FSDP the
average is sharded as the parameters are; `state_dict` gathers it whole (every process calls it)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from medstate.errors import MedstateError
from medstate.train.distributed import full_tensor, sharded_like


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise MedstateError(f"ema_decay must be between 0 and 1, got {decay}")
        self.decay = decay
        self.shadow = {name: p.detach().float().clone() for name, p in self._parameters(model)}

    @staticmethod
    def _parameters(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Parameter]]:
        # the trained parameters (a frozen base under LoRA adapters does not move)
        return ((n, p) for n, p in model.named_parameters() if p.dtype.is_floating_point and p.requires_grad)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        for name, parameter in self._parameters(model):
            self.shadow[name].lerp_(parameter.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite the model's weights with the average."""
        for name, parameter in self._parameters(model):
            parameter.copy_(self.shadow[name])

    @contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[torch.nn.Module]:
        trained = {name: p.detach().clone() for name, p in self._parameters(model)}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, parameter in self._parameters(model):
                    parameter.copy_(trained[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: full_tensor(tensor) for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise MedstateError("the saved EMA weights do not match this model's parameters")
        self.shadow = {name: sharded_like(state[name].float().clone(), self.shadow[name]) for name in self.shadow}
