"""What every text training recipe does around its trainer: open the run directory (the resolved config written
by the first process), the next-token loss over a packed batch, and the model to use at the end (best or last
weights, EMA applied, LoRA adapters saved and merged) exported with its tokenizer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import yaml

from medstate.ssm import MambaLM
from medstate.ssm.lora import has_lora, merge_lora, save_adapter
from medstate.text.models import load_language_model
from medstate.text.packing import IGNORE
from medstate.text.tokenizer import TextTokenizer
from medstate.train.distributed import World, world
from medstate.train.ema import EMA
from medstate.train.loop import Trainer


def open_run(config: Any, run_dir: str | Path) -> tuple[Path, World]:
    """The run directory and this process; under torchrun every process trains and only the first one writes,
    here the resolved config."""
    run_dir, here = Path(run_dir), world()
    if here.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False))
    return run_dir, here


def language_model_loss(model: MambaLM, batch: dict) -> tuple[torch.Tensor, int]:
    """Mean next-token loss over the scored labels of a batch, and how many there are."""
    out = model(batch["input_ids"], seq_idx=batch.get("seq_idx"), labels=batch["labels"], return_logits=False)
    return out.loss, int((batch["labels"][:, 1:] != IGNORE).sum())


def export_model(trainer: Trainer, tokenizer: TextTokenizer, directory: Path) -> Path:
    """The model to use: the best validated one where there is validation (EMA weights when there is an EMA),
    else the last weights (EMA applied); with its tokenizer, in the Hugging Face layout. Read from the run's
    checkpoints, which hold whole weights, so the first process alone writes it whatever the parallelism. A model
    trained with LoRA adapters is written twice: the adapters (PEFT's format) in `adapter/` beside `directory`, and
    merged into a plain model in `directory`."""
    if trainer.best_dir.is_dir():
        model = load_language_model(trainer.best_dir)
    else:
        model = load_language_model(trainer.checkpoint_dir)
        if trainer.ema is not None:
            ema = EMA(model, trainer.ema.decay)
            ema.load_state_dict(torch.load(trainer.checkpoint_dir / "trainer_state.pt", weights_only=True)["ema"])
            ema.copy_to(model)
    if has_lora(model):
        save_adapter(model, directory.with_name("adapter"))
        merge_lora(model)
    model.save_pretrained(directory)
    tokenizer.save(directory)
    return directory
