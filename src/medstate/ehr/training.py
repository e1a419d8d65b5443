"""EhrMamba pretraining (next-event prediction), prompted finetuning and prediction, on `prepare`'s output.

- Pretraining: every training subject's history, packed into token-budget rows, with the model's own objective
  (`pretraining_loss`): next-event prediction for EhrMamba, masked language modelling for the Transformers.
- Multitask prompted finetuning (MPF): all tasks in one phase; each epoch draws the same number of samples from
  every task (with replacement for the smaller ones), so frequent tasks do not drown rare ones. One classifier reads
  the final task token. Single-task finetuning is the same with one task.
- `predict` scores a split: (subject_id, task, visit_key, prediction_time, y_true, y_score) with y_score the
  probability, never a hard label.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F

from medstate.ehr.batching import collate, token_budget_batches
from medstate.ehr.model import EhrMamba, EhrMambaConfig
from medstate.ehr.store import Samples
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError
from medstate.loading import PATH, expect_mapping, load_settings, read_json, read_yaml
from medstate.ssm import lora as lora_adapters
from medstate.ssm.lora import LoraSettings, add_lora, has_lora, is_adapter, load_adapter
from medstate.train.loop import TrainConfig, Trainer, TrainResult, checkpoint_step, seed_everything

PREPARED_FILES = ("vocab.json", "value_bins.json", "tasks.yaml", "prepare.yaml")
STAGES = ("pretrain", "finetune")
# where a stage's default differs from the settings classes': finetuning starts from a trained model
STAGE_DEFAULTS = {"pretrain": {}, "finetune": {"train.lr": 5e-4}}


@dataclass
class EhrTrainSettings:
    """One pretraining or finetuning run, as plain data (`load_settings(EhrTrainSettings, file, overrides)`): what it
    starts from (`start_model`) and how it trains."""

    model: str = "ehrmamba"  # a new model's kind (MODEL_KINDS)
    sizes: dict[str, Any] = field(default_factory=dict)  # a new model's sizes; None: the config's default
    init: str | None = field(default=None, metadata=PATH)  # the pretrained checkpoint to start from
    tasks: list[str] | None = None  # finetuning: these tasks (None: all, prompted multitask)
    token_budget: int = 8192  # tokens per packed batch
    lora: LoraSettings | None = None  # finetuning: adapters on `init`, the classifier trained whole
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def read(cls, path: str | Path | None = None, overrides: dict | None = None, stage: str = "pretrain"):
        """The stage's defaults, a YAML file of these fields over them (relative paths beside it; None: no file)
        and typed dotted overrides on top (`load_settings`)."""
        if stage not in STAGES:
            raise MedstateError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
        return load_settings(cls, path, overrides, f"{stage} settings", STAGE_DEFAULTS[stage])


def run_training(
    stage: str, prepared: str | Path, run_dir: str | Path, settings: EhrTrainSettings, progress=None
) -> TrainResult:
    """`stage` (pretrain or finetune) from start to end, or resumed from the run's own checkpoint: seeded, the model
    chosen by `start_model`, warm-up no longer than the run."""
    if stage not in STAGES:
        raise MedstateError(f"stage must be one of {', '.join(STAGES)}, got {stage!r}")
    sizes = dict(settings.sizes)
    if settings.model != "ehrmamba":
        sizes.pop("ssm_version", None)  # the mixer's version is EhrMamba's alone
    lora = settings.lora
    if lora is not None and "classifier" not in lora.modules_to_save:
        lora = dataclasses.replace(lora, modules_to_save=[*lora.modules_to_save, "classifier"])
    train = dataclasses.replace(settings.train, warmup_steps=min(settings.train.warmup_steps, settings.train.max_steps))
    seed_everything(train.seed)
    model, _ = start_model(run_dir, prepared, init=settings.init, kind=settings.model, sizes=sizes, lora=lora)
    if stage == "pretrain":
        return pretrain(prepared, run_dir, model, train, settings.token_budget, progress)
    return finetune(prepared, run_dir, model, train, settings.tasks, settings.token_budget, progress)


MODEL_KINDS = ("ehrmamba", "lstm", "bert", "bigbird")


def new_model(prepared: Path, model_config: dict | None = None, kind: str = "ehrmamba"):
    """A freshly initialised EhrMamba (or baseline) sized for the prepared vocabulary. The BERT-style baseline reads
    512 tokens by default; BigBird reads the prepared context length, as EhrMamba does."""
    from medstate.ehr.baselines.lstm import EhrLSTM, EhrLSTMConfig
    from medstate.ehr.baselines.transformer import EhrTransformer, EhrTransformerConfig

    prepared = Path(prepared)
    sizes = {"vocab_size": len(Vocabulary.load(prepared / "vocab.json")), **(model_config or {})}
    if kind == "ehrmamba":
        return EhrMamba(EhrMambaConfig(**sizes))
    if kind == "lstm":
        return EhrLSTM(EhrLSTMConfig(**sizes))
    if kind in ("bert", "bigbird"):
        context = 512 if kind == "bert" else prepared_max_length(prepared)
        return EhrTransformer(EhrTransformerConfig(**{"architecture": kind, "context": context, **sizes}))
    raise MedstateError(f"unknown model kind {kind!r}; choose one of {', '.join(MODEL_KINDS)}")


def start_model(
    run_dir: str | Path,
    prepared: str | Path,
    init: str | Path | None = None,
    kind: str = "ehrmamba",
    sizes: dict | None = None,
    lora: LoraSettings | None = None,
) -> tuple[object, int]:
    """The model a training run starts from, decided here and nowhere else: the run's own last checkpoint when it
    has one (a resume; sizes the caller sets must match it), else the weights of `init`, else a new `kind` model
    with `sizes` (a size left None takes the config's default). With `lora`, `init` is frozen and adapters are
    trained (a resumed run's checkpoint holds them). Returns the model and the step it resumes from (0: a fresh
    start)."""
    sizes = {name: value for name, value in (sizes or {}).items() if value is not None}
    checkpoint = Path(run_dir) / "checkpoints" / "last"
    done = checkpoint_step(checkpoint)
    source = checkpoint if done else init
    if lora is not None and init is None:
        raise MedstateError("LoRA finetunes a pretrained model: give --init")
    if source is None:
        return new_model(Path(prepared), sizes, kind), 0
    model = load_model(source)
    if lora is not None and not done:
        add_lora(model, lora, base=Path(init).resolve())
    elif done and (lora is not None) != has_lora(model):
        have = "has" if has_lora(model) else "has no"
        raise MedstateError(f"{run_dir} resumes a run at step {done} that {have} LoRA adapters: use a new run "
                            "directory, or the same LoRA setting")  # fmt: skip
    different = {k: v for k, v in sizes.items() if getattr(model.config, k, v) != v}
    if different:
        held = ", ".join(f"{k}={getattr(model.config, k)}" for k in different)
        asked = ", ".join(f"{k}={v}" for k, v in different.items())
        what = f"{run_dir} resumes a run at step {done}" if done else f"{init} holds a model"
        raise MedstateError(f"{what} with {held}, not {asked}: use a new run directory, or leave the sizes out")
    return model, done


def prepared_max_length(prepared: Path) -> int:
    path = Path(prepared) / "prepare.yaml"
    settings = expect_mapping(read_yaml(path, "prepared settings"), str(path))
    if not isinstance(settings.get("max_length"), int):
        raise MedstateError(f"{path}: max_length must be an integer; run `medstate ehr prepare` again")
    return settings["max_length"]


def load_model(directory: str | Path):
    """Any medstate EHR checkpoint, by the model_type in its config.json; a LoRA adapter directory loads its base
    checkpoint with the adapters on it."""

    from medstate.ehr.baselines.lstm import EhrLSTM
    from medstate.ehr.baselines.transformer import EhrTransformer

    if is_adapter(directory):
        return load_adapter(directory, load_model)
    path = Path(directory) / "config.json"
    model_type = expect_mapping(read_json(path, "checkpoint config"), str(path)).get("model_type")
    classes = {cls.MODEL_TYPE: cls for cls in (EhrMamba, EhrLSTM, EhrTransformer)}
    if model_type not in classes:
        raise MedstateError(f"{directory}: unknown model_type {model_type!r}")
    return classes[model_type].from_pretrained(directory)


def merge_adapter(adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """A LoRA-finetuned checkpoint (adapters + classifier, PEFT's format) merged into its base: a plain checkpoint
    with the prepared files (vocabulary, bins, tasks) of the base."""
    base = lora_adapters.merge_adapter(adapter_dir, out_dir, load_model)
    for name in PREPARED_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, Path(out_dir) / name)
    return Path(out_dir)


def attach_prepared(run_dir: Path, prepared: Path) -> None:
    """The vocabulary, bins and task definitions travel with every checkpoint of the run."""
    for checkpoint in (run_dir / "checkpoints").glob("*"):
        for name in PREPARED_FILES:
            if (prepared / name).is_file():
                shutil.copy(prepared / name, checkpoint / name)


def pretrain(
    prepared: str | Path,
    run_dir: str | Path,
    model: EhrMamba,
    config: TrainConfig,
    token_budget: int = 8192,
    progress=None,
) -> TrainResult:
    prepared = Path(prepared)
    samples = Samples.read(prepared, "pretrain", "train")

    def batches(epoch: int) -> list[list[int]]:
        order = np.random.default_rng([config.seed, epoch]).permutation(len(samples.arrays))
        return token_budget_batches(samples.lengths, token_budget, order)

    def loss_fn(model, indices: list[int]):
        batch = collate([samples.arrays[i] for i in indices], with_lm_targets=True)
        # the loss is a mean over the scored events: batches and processes are weighted by their count
        return model.pretraining_loss(batch), int((batch["lm_targets"] != -100).sum())

    result = Trainer(model, loss_fn, batches, config, run_dir, progress).fit()
    attach_prepared(Path(run_dir), prepared)
    return result


def finetune(
    prepared: str | Path,
    run_dir: str | Path,
    model: EhrMamba,
    config: TrainConfig,
    tasks: list[str] | None = None,
    token_budget: int = 8192,
    progress=None,
) -> TrainResult:
    prepared = Path(prepared)
    samples = Samples.read(prepared, "finetune", "train", tasks)
    if not samples.arrays:
        raise MedstateError(f"no training samples for tasks {tasks or 'all'} in {prepared}")
    labels = torch.tensor(samples.frame["label"].to_numpy(), dtype=torch.float32)
    by_task = {
        task: np.flatnonzero(samples.frame["task"].to_numpy() == task) for task in samples.frame["task"].unique()
    }
    per_task = int(np.median([len(v) for v in by_task.values()]))

    def batches(epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([config.seed, epoch])
        drawn = [rng.choice(idx, per_task, replace=len(idx) < per_task) for _, idx in sorted(by_task.items())]
        order = rng.permutation(np.concatenate(drawn))
        return token_budget_batches(samples.lengths, token_budget, order)

    def loss_fn(model: EhrMamba, indices: list[int]):
        batch = collate([samples.arrays[i] for i in indices])
        logits = model(batch, ends=batch["ends"]).class_logits
        # a mean over the batch's samples: batches and processes are weighted by their number of samples
        return F.binary_cross_entropy_with_logits(logits.float(), labels[indices]), len(indices)

    result = Trainer(model, loss_fn, batches, config, run_dir, progress).fit()
    attach_prepared(Path(run_dir), prepared)
    return result


def predictions_for_report(
    model, prepared: str | Path, name: str, seed: int, tasks: list[str] | None = None
) -> pl.DataFrame:
    """Tuning and held-out predictions in the report's layout (subject_id, task, model, seed, split, y_true,
    y_score, …)."""
    frames = [
        predict(model, prepared, split, tasks).with_columns(pl.lit(split).alias("split"))
        for split in ("tuning", "held_out")
    ]
    return pl.concat(frames).with_columns(pl.lit(name).alias("model"), pl.lit(seed).alias("seed"))


@torch.no_grad()
def predict(
    model, prepared: str | Path, split: str, tasks: list[str] | None = None, token_budget: int = 16384
) -> pl.DataFrame:
    samples = Samples.read(prepared, "finetune", split, tasks)
    model.eval()
    scores = np.zeros(len(samples.arrays), dtype=np.float64)
    for indices in token_budget_batches(samples.lengths, token_budget):
        batch = collate([samples.arrays[i] for i in indices])
        scores[indices] = torch.sigmoid(model(batch, ends=batch["ends"]).class_logits.double()).numpy()
    return samples.frame.select(
        "subject_id", "task", "visit_key", "prediction_time", pl.col("label").alias("y_true")
    ).with_columns(pl.Series("y_score", scores))
