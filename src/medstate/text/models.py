"""The language models the text recipes train: Mamba / Mamba-2 (`MambaLM`) or the same-size GPT-2-style
Transformer baseline (`TransformerLM`), chosen by `architecture` in a config's `model:` and by `model_type` in a
checkpoint's config.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from medstate.errors import MedstateError
from medstate.loading import expect_mapping, from_data, read_json
from medstate.ssm import MambaLM, SSMConfig, load_pretrained
from medstate.text.transformer import TransformerLM, TransformerSizes


def new_language_model(model: dict[str, Any], vocab_size: int, where: str = "model") -> MambaLM | TransformerLM:
    """A new model from a config's `model:` mapping (SSMConfig fields, or `architecture: gpt2` and
    TransformerSizes fields)."""
    if model.get("architecture", "mamba") == "gpt2":
        return TransformerLM(from_data(TransformerSizes, model, where), vocab_size)
    sizes = {k: v for k, v in model.items() if k != "architecture"}
    if model.get("architecture", "mamba") != "mamba":
        raise MedstateError(f"{where}: architecture must be mamba or gpt2, got {model['architecture']!r}")
    return MambaLM(from_data(SSMConfig, {**sizes, "vocab_size": vocab_size}, where))


def load_language_model(path: str | Path, device: torch.device | str = "cpu") -> MambaLM | TransformerLM:
    """A local checkpoint in the Hugging Face layout (or mamba_ssm's), in eval mode."""
    config = Path(path) / "config.json"
    if (
        config.is_file()
        and expect_mapping(read_json(config, "checkpoint config"), str(config)).get("model_type") == "gpt2"
    ):
        return TransformerLM.from_pretrained(path, device)
    return load_pretrained(path, device=device)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A LoRA adapter directory (PEFT's format) merged into its base model, written as a plain checkpoint in the
    Hugging Face layout with the base model's tokenizer."""
    from medstate.ssm import lora
    from medstate.text.tokenizer import TextTokenizer

    base = lora.merge_adapter(adapter_dir, out_dir, load_pretrained)
    TextTokenizer.load(base).save(Path(out_dir))
    return Path(out_dir)
