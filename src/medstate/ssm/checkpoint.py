"""Checkpoint I/O for local directories (no network).

Reads
  * Hugging Face layout: config.json with model_type "mamba" or "mamba2", and model.safetensors,
    model.safetensors.index.json (shards), pytorch_model.bin or pytorch_model.bin.index.json;
  * mamba_ssm native layout: config.json with d_model, n_layer, ssm_cfg, pad_vocab_size_multiple, and
    pytorch_model.bin (e.g. state-spaces/mamba2-130m).
Writes the Hugging Face layout (config.json + model.safetensors) that transformers loads back.
Pickled weights are only read with torch.load(weights_only=True): no arbitrary objects are unpickled.

Plain tensors and configs only: no model is built here (as in mamba-ssm's checkpoint helpers); `ssm.model`'s
`load_pretrained` / `save_pretrained` build and take the model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from medstate.errors import MedstateError
from medstate.loading import expect_mapping, read_json
from medstate.ssm.config import SSMConfig

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def read_config(directory: Path) -> SSMConfig:
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise MedstateError(f"{directory} has no config.json; expected a Hugging Face or mamba_ssm checkpoint")
    data = expect_mapping(read_json(config_path, "checkpoint config"), str(config_path))
    try:
        if "model_type" in data:
            return SSMConfig.from_hf_dict(data)
        if {"d_model", "n_layer"} <= data.keys():
            return SSMConfig.from_mamba_ssm_dict(data)
    except KeyError as err:
        raise MedstateError(f"{config_path}: missing key {err.args[0]}") from None
    except (TypeError, ValueError) as err:
        raise MedstateError(f"{config_path}: a value has the wrong type ({err})") from None
    raise MedstateError(f"{config_path}: neither a Hugging Face config (model_type) nor a mamba_ssm config (d_model)")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, OSError, EOFError) as err:
        raise MedstateError(f"cannot read weights from {path}: {err}") from None


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    for name in WEIGHT_FILES:
        path = directory / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = expect_mapping(read_json(path, "shard index"), str(path))
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise MedstateError(f"{path}: weight_map must map parameter names to shard files")
            shards = sorted(set(weight_map.values()))
            if not shards:
                raise MedstateError(f"{path} lists no shards in weight_map")
            weights: dict[str, torch.Tensor] = {}
            for shard in shards:
                if not (directory / shard).is_file():
                    raise MedstateError(f"{path} refers to missing shard {shard}")
                weights.update(_load_file(directory / shard))
            return weights
        return _load_file(path)
    raise MedstateError(f"{directory} has no weights (looked for {', '.join(WEIGHT_FILES)})")


def canonical_names(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map HF base-model and mamba_ssm names onto MambaLM's (HF MambaForCausalLM) names."""
    renamed = {}
    has_prefix = any(k.startswith("backbone.") for k in weights)
    for key, value in weights.items():
        if not has_prefix and not key.startswith("lm_head."):
            key = "backbone." + key
        key = key.replace("backbone.embedding.", "backbone.embeddings.")
        renamed[key] = value
    return renamed


def write_checkpoint(directory: str | Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    """config.json + model.safetensors in the Hugging Face layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory
