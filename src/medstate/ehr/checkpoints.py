"""Checkpoints of the EHR models in Hugging Face layout: config.json (with a model_type) + model.safetensors.

Tied weights (one tensor under several names, e.g. concept embedding = backbone embedding = LM head) are stored
once; on load, exactly those names may be absent from the file. A model with LoRA adapters saves the adapters
(PEFT's format, naming its base checkpoint), and such a directory loads as the base model with the adapters on it."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from medstate.errors import MedstateError
from medstate.loading import expect_mapping, from_data, read_json


def _tied_aliases(module: nn.Module) -> tuple[dict, set[str]]:
    """The state dict with each tensor under its first name only, and the later names (aliases)."""
    state, seen, aliases = {}, set(), set()
    for name, tensor in module.state_dict().items():
        if tensor.data_ptr() in seen:
            aliases.add(name)
        else:
            seen.add(tensor.data_ptr())
            state[name] = tensor.contiguous()
    return state, aliases


class CheckpointMixin:
    """`save_pretrained` / `from_pretrained` for a module with a dataclass `config`; subclasses set MODEL_TYPE and
    CONFIG_CLASS."""

    MODEL_TYPE: str
    CONFIG_CLASS: type

    def save_pretrained(self, directory: str | Path) -> None:
        from medstate.ssm.lora import has_lora, save_adapter

        if has_lora(self):
            save_adapter(self, directory)
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"model_type": self.MODEL_TYPE, **asdict(self.config)}
        (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(_tied_aliases(self)[0], directory / "model.safetensors")

    @classmethod
    def from_pretrained(cls, directory: str | Path):
        from medstate.ssm.lora import is_adapter, load_adapter

        directory = Path(directory)
        if is_adapter(directory):
            return load_adapter(directory, cls.from_pretrained)
        path = directory / "config.json"
        data = dict(expect_mapping(read_json(path, "checkpoint config"), str(path)))
        if data.pop("model_type", None) != cls.MODEL_TYPE:
            raise MedstateError(f"{directory} does not hold a {cls.__name__} checkpoint")
        model = cls(from_data(cls.CONFIG_CLASS, data, str(path)))
        missing, unexpected = model.load_state_dict(load_file(directory / "model.safetensors"), strict=False)
        if unexpected or set(missing) - _tied_aliases(model)[1]:
            raise MedstateError(
                f"{directory}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})"
            )
        return model
