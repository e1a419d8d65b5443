"""Continued pretraining (or pretraining from scratch) of a Mamba language model on a weighted mix of corpora: the
BioMamba recipe, in one readable file over small parts (tokenizer, corpora, contamination guard, mixed packed stream,
the training loop with its schedule, layer-wise decay and EMA, perplexity on held-out text).

A run directory ends up holding:
    config.yaml          the resolved configuration (absolute paths)
    contamination.json   what the guard removed from the training corpora, by source and reason
    log.csv              step, loss, learning rate, tokens, seconds, validation
    checkpoints/last/    the latest state (resume after a kill continues exactly), checkpoints/best/ (EMA weights)
    model/               the model to use (best validation, EMA weights) + its tokenizer, Hugging Face layout
    metrics.json         perplexity and bits per byte on every validation corpus (95% intervals), realised
                         shares of the mix, tokens and tokens per second
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medstate.errors import MedstateError
from medstate.loading import PATH, load_settings
from medstate.ssm import MambaLM
from medstate.text.contamination import ContaminationGuard, find_contamination
from medstate.text.corpora import CorpusSource, Document, read_documents
from medstate.text.evaluate import evaluate_corpora, score_documents
from medstate.text.mixing import MixedStream
from medstate.text.models import load_language_model, new_language_model
from medstate.text.packing import LAYOUTS, collate
from medstate.text.runs import export_model, language_model_loss, open_run
from medstate.text.tokenizer import TextTokenizer, padded_vocab_size
from medstate.text.transformer import TransformerLM
from medstate.train.loop import TrainConfig, Trainer


@dataclass
class PretrainConfig:
    tokenizer: str = field(metadata=PATH)
    corpora: list[CorpusSource]
    validation: list[CorpusSource] = field(default_factory=list)  # scored; the first one selects the best model
    held_out: list[CorpusSource] = field(default_factory=list)  # kept out of training, not scored here
    init: str | None = field(
        default=None, metadata=PATH
    )  # a checkpoint directory to continue from; None: a new model of `model`'s sizes
    model: dict[str, Any] = field(default_factory=dict)  # a new model's sizes (`text.models.new_language_model`)
    vocab_multiple: int = 16
    seq_len: int = 1024
    batch_size: int = 8  # rows per micro-batch (× train.grad_accumulation per optimizer step)
    layout: str = "packed"  # packed | padded (BioMamba's: one document per row)
    shuffle_buffer: int = 10_000
    decontaminate: bool = True
    ngram: int = 13
    min_overlap: float = 0.1
    eval_length: int = 2048
    eval_batch_size: int = 8
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise MedstateError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.seq_len < 2 or self.batch_size < 1:
            raise MedstateError("seq_len must be >= 2 and batch_size >= 1")
        names = [s.name for s in [*self.corpora, *self.validation, *self.held_out]]
        if len(set(names)) != len(names):
            raise MedstateError(f"corpus names must be unique across corpora, validation and held_out: {names}")

    @classmethod
    def read(cls, path: str | Path, overrides: dict | None = None) -> PretrainConfig:
        """A YAML file (relative paths in it are relative to its folder) with typed overrides (`load_settings`)."""
        return load_settings(cls, path, overrides, "pretraining config")


def new_or_loaded_model(config: PretrainConfig, tokenizer: TextTokenizer) -> MambaLM | TransformerLM:
    if config.init is not None:
        model = load_language_model(config.init).train()
        if model.config.vocab_size < len(tokenizer):
            raise MedstateError(
                f"{config.init} has {model.config.vocab_size} embedding rows, fewer than the tokenizer's "
                f"{len(tokenizer)} ids: they are not made for each other"
            )
        return model
    vocab_size = padded_vocab_size(len(tokenizer), config.vocab_multiple)
    torch.manual_seed(config.train.seed)
    return new_language_model(config.model, vocab_size, "pretraining config: model")


class RowBatches:
    """Batches of `batch_size` rows of a mixed stream; its position is the stream's. Sharded over `world`
    processes, every process reads the same stream and process r keeps rows r, r + world, ... of each
    `batch_size × world` rows: together one batch of a single process with `batch_size × world` rows."""

    def __init__(self, stream: MixedStream, batch_size: int):
        self.stream, self.batch_size = stream, batch_size
        self.rank, self.world = 0, 1

    def shard(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world

    def __next__(self) -> dict:
        rows = [next(self.stream) for _ in range(self.batch_size * self.world)]
        return collate(rows[self.rank :: self.world], packed=self.stream.builder.layout == "packed")

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


def documents_of(sources: list[CorpusSource]) -> list[Document]:
    return [d for s in sources for d in read_documents(s)]


@dataclass
class PretrainResult:
    run_dir: Path
    model_dir: Path
    steps: int
    metrics: dict


def pretrain(
    config: PretrainConfig, run_dir: str | Path, progress: Callable[[int, int, float], None] | None = None
) -> PretrainResult:
    run_dir, here = open_run(config, run_dir)
    tokenizer = TextTokenizer.load(config.tokenizer)
    model = new_or_loaded_model(config, tokenizer).to(here.device())
    validation = {s.name: list(read_documents(s)) for s in config.validation}
    exclude: dict[str, set[str]] = {}
    if config.decontaminate:
        held = [d for documents in validation.values() for d in documents] + documents_of(config.held_out)
        report = find_contamination(config.corpora, ContaminationGuard(held, config.ngram, config.min_overlap))
        if here.main:
            (run_dir / "contamination.json").write_text(json.dumps(report.to_dict(), indent=1) + "\n")
        exclude = report.excluded()
    stream = MixedStream(
        config.corpora, tokenizer, config.seq_len, config.train.seed, config.layout, exclude, config.shuffle_buffer
    )
    selection = next(iter(validation.values()), None)

    def evaluate(scored: torch.nn.Module) -> float:
        scores = score_documents(scored, tokenizer, selection, config.eval_length, config.eval_batch_size)
        return float(scores.nll.sum() / scores.tokens.sum())

    trainer = Trainer(
        model, language_model_loss, RowBatches(stream, config.batch_size), config.train, run_dir, progress,
        evaluate if selection else None,
    )  # fmt: skip
    started = time.perf_counter()
    result = trainer.fit()
    seconds = time.perf_counter() - started
    model_dir = run_dir / "model"
    if not here.main:
        return PretrainResult(run_dir, model_dir, result.steps, {})
    export_model(trainer, tokenizer, model_dir)
    final = load_language_model(model_dir, device=here.device())
    metrics = {
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "rows": stream.rows,
        "real_tokens": sum(c.tokens for c in stream.cursors),  # document tokens trained on (not padding)
        "seconds": seconds,  # this process, validation included
        "realised_shares": stream.realised_shares(),
        "requested_shares": dict(zip([s.name for s in config.corpora], stream.shares.tolist())),
        "validation": evaluate_corpora(final, tokenizer, validation, config.eval_length, config.eval_batch_size),
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    return PretrainResult(run_dir, model_dir, result.steps, metrics)
