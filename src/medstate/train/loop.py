"""A small training loop with exact resume.

AdamW (torch's fused kernel where it applies; weight decay on weight matrices only, optional layer-wise
learning-rate decay), a schedule from `train.schedules`, gradient clipping and accumulation, optional bf16
autocast, an optional EMA of the weights,
optional validation with a best checkpoint. Every `save_every` steps the loop writes `checkpoints/last/`: the model
(safetensors, via the model's `save_pretrained`), the optimizer, schedule, EMA and data position
(`trainer_state.pt`, tensors and plain data only, read back with `weights_only=True`) and the RNG states. A run
directory that holds a checkpoint resumes from it, and the run then ends exactly as an uninterrupted one.

Batches come from a `BatchStream` (`train.batches`: next batch, and a `state_dict` for its position) or, for data
small enough to list, from a function `batches(epoch)` whose order depends only on the seed and the epoch.

With validation (`evaluate(model) -> float`, lower is better) every `eval_every` steps and at the end, the model
scored (the EMA weights when there is an EMA) is saved to `checkpoints/best/` when it improves on the best so far.

Logs (`train.log`): `log.csv` (step, loss, learning rate, tokens, seconds, validation) and, when tensorboard is
installed, `tensorboard/`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.nn.parallel import DistributedDataParallel

from medstate.errors import MedstateError
from medstate.train.batches import BatchStream, EpochBatches
from medstate.train.distributed import all_reduce_sum, barrier, gathered, shard_fully, world
from medstate.train.ema import EMA
from medstate.train.log import NoLog, TrainLog
from medstate.train.memory import KeptGradients, retained_memory
from medstate.train.param_groups import parameter_groups
from medstate.train.precision import use_bf16
from medstate.train.schedules import check_schedule, learning_rate_factor


@dataclass
class TrainConfig:
    max_steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant (after warmup) | wsd (see train.schedules)
    wsd_fractions: list[float] = field(default_factory=lambda: [0.1, 0.7, 0.2])
    decay_shape: str = "cosine"  # wsd's decay: cosine | linear | 1-sqrt
    min_lr_ratio: float = 0.0  # wsd's floor, as a fraction of the peak
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    layer_decay: float | None = None  # layer-wise learning-rate decay γ (see train.param_groups)
    embeddings_at_peak: bool = False  # BioMamba's behaviour: tied embeddings at the peak rate
    ema_decay: float | None = None
    grad_accumulation: int = 1
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool | str = False  # true, false or "auto" (bf16 autocast where it measures faster, train.precision)
    save_every: int = 50
    parallel: str = "ddp"  # with several processes: ddp (replicas) or fsdp (weights, gradients, optimizer sharded)
    log_every: int = 10
    eval_every: int = 0  # 0: validate only at the end (when there is a validation function)
    # flush subnormal floats to zero on CPU while training: gradients that decay along a long history fall into the
    # subnormal range, where CPU arithmetic is 10-50x slower (a 16k-token EhrMamba step: 3x faster with it)
    flush_denormal: bool = True
    # on CPU, keep freed memory for the next step instead of unmapping and page-faulting it in again (train.memory):
    # a 16k-token step 1.5x faster for 25% more peak memory
    retain_memory: bool = True

    def __post_init__(self) -> None:
        check_schedule(self)
        if self.grad_accumulation < 1 or self.max_steps < 1:
            raise MedstateError("max_steps and grad_accumulation must be at least 1")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise MedstateError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.parallel not in ("ddp", "fsdp"):
            raise MedstateError(f"parallel must be ddp or fsdp, got {self.parallel!r}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class TrainResult:
    steps: int
    last_loss: float
    resumed_from: int | None
    seconds: float
    best: float | None = None  # best validation value (lower is better)


class Trainer:
    """`batches` is a `BatchStream` or a function `batches(epoch) -> list`; `loss_fn(model, batch)` returns
    (mean loss over the batch's scored items, their number: tokens, or samples for a per-sample loss)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]],
        batches: BatchStream | Callable[[int], list],
        config: TrainConfig,
        run_dir: str | Path,
        progress: Callable[[int, int, float], None] | None = None,
        evaluate: Callable[[torch.nn.Module], float] | None = None,
    ):
        self.model, self.loss_fn, self.config = model, loss_fn, config
        self.world = world()
        self.batches = batches if hasattr(batches, "state_dict") else EpochBatches(batches)
        if self.world.size > 1:
            self.batches.shard(self.world.rank, self.world.size)
        # forward and backward go through the loss as a module, so that DDP / FSDP see whatever the loss calls on
        # the model (a forward, or a method such as EhrMamba.pretraining_loss) and average gradients in backward
        loss_module = _LossModule(model, loss_fn)
        self.sharded = self.world.size > 1 and config.parallel == "fsdp"
        if self.sharded:
            # the first process keeps a plain copy on the CPU to write whole checkpoints from
            self._plain = copy.deepcopy(model).to("cpu") if self.world.main else None
            self.wrapped = shard_fully(loss_module)  # before the optimizer: its parameters become DTensor shards
        else:
            # static graph: a loss may leave the same parameters unused at every step (EhrMamba's classifier in
            # pretraining), which plain DDP takes for an error
            self.wrapped = (
                DistributedDataParallel(loss_module, static_graph=True) if self.world.size > 1 else loss_module
            )
        self.evaluate = evaluate
        self.run_dir = Path(run_dir)
        self.progress = progress or (lambda step, total, loss: None)
        groups = parameter_groups(
            model, config.lr, config.weight_decay, config.layer_decay, embeddings_at_peak=config.embeddings_at_peak
        )
        self.optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), fused=_fusable(model))
        self._kept_gradients: KeptGradients | None = None
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: learning_rate_factor(s, config))
        self.ema = EMA(model, config.ema_decay) if config.ema_decay else None
        self.bf16 = use_bf16(config.bf16, next(model.parameters()).device)
        self.best: float | None = None

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    @property
    def best_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "best"

    def fit(self) -> TrainResult:
        with retained_memory(self.config.retain_memory and self._device.type == "cpu") as kept:
            # one process: gradient buffers allocated first and kept (DDP and FSDP manage their own)
            self._kept_gradients = KeptGradients(self.model.parameters()) if kept and self.world.size == 1 else None
            torch.set_flush_denormal(self.config.flush_denormal)
            try:
                return self._fit()
            finally:
                torch.set_flush_denormal(False)  # torch's default: leave the process as we found it
                if self._kept_gradients is not None:
                    self._kept_gradients.close()
                    self._kept_gradients = None

    def _fit(self) -> TrainResult:
        started = time.perf_counter()
        main = self.world.main  # only the first process writes checkpoints and logs
        if main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            resolved = {**asdict(self.config), "bf16_used": self.bf16}
            (self.run_dir / "train_config.yaml").write_text(yaml.safe_dump(resolved))
        seed_everything(self.config.seed)
        step, resumed = 0, None
        if checkpoint_step(self.checkpoint_dir):  # the one test of "resume or start" (ehr.training.start_model too)
            step = resumed = self._load()
        log = TrainLog(self.run_dir, append=resumed is not None, step=step) if main else NoLog()
        last_loss = float("nan")
        self.model.train()
        device_type = next(self.model.parameters()).device.type
        while step < self.config.max_steps:
            last_loss, tokens = self._step(device_type)
            step += 1
            log.add(step, last_loss, self.scheduler.get_last_lr()[0], tokens)
            self.progress(step, self.config.max_steps, last_loss)
            last = step == self.config.max_steps
            if self.evaluate is not None and (last or (self.config.eval_every and step % self.config.eval_every == 0)):
                log.add_validation(step, self._validate(step))
            if step % self.config.save_every == 0 or last:
                log.flush()
                self._save(step)
                barrier()  # no process reads or resumes past a checkpoint that is not on disk yet
        log.close()
        return TrainResult(step, last_loss, resumed, time.perf_counter() - started, self.best)

    def _step(self, device_type: str) -> tuple[float, int]:
        """One optimizer step over `grad_accumulation` batches (on every process); the gradient is that of the mean
        loss over all their scored tokens, each batch weighted by its tokens, so accumulation and several processes
        equal one large batch."""
        accumulate, processes = self.config.grad_accumulation, self.world.size
        exact = accumulate == 1 and processes == 1  # one batch: the loss's own gradient, nothing rescaled
        if self._kept_gradients is None:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self._kept_gradients.zero()
        total_loss, total_tokens = 0.0, 0
        for micro in range(accumulate):
            batch = _to_device(next(self.batches), self._device)
            with self._gradient_sync(micro == accumulate - 1):
                with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
                    loss, tokens = self.wrapped(batch)
                (loss if exact else loss * tokens).backward()
            total_loss += float(loss.detach()) * tokens
            total_tokens += tokens
        if self._kept_gradients is not None:
            self._kept_gradients.release_untouched()
        if not exact:
            total_loss, total_tokens = all_reduce_sum([total_loss, total_tokens], self._device)
            # DDP averaged the per-process sums of loss x tokens: x processes / all tokens = the global token mean
            for parameter in self.model.parameters():
                if parameter.grad is not None and total_tokens:
                    parameter.grad *= processes / total_tokens
        if self.config.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update(self.model)
        return (total_loss / total_tokens if total_tokens else float("nan")), int(total_tokens)

    @contextlib.contextmanager
    def _gradient_sync(self, sync: bool):
        """Backward inside averages gradients over the processes only when `sync` (the last micro-batch)."""
        if sync or self.world.size == 1:
            yield
        elif self.sharded:
            self.wrapped.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.wrapped.set_requires_gradient_sync(True)
        else:
            with self.wrapped.no_sync():
                yield

    @contextlib.contextmanager
    def _whole(self):
        """The model with its whole weights: gathered from the shards under FSDP (every process enters)."""
        with gathered(self.wrapped) if self.sharded else contextlib.nullcontext():
            yield self.model

    def _write_model(self, directory: Path) -> None:
        """The model's weights, whole, in its own checkpoint format (every process calls; the first writes)."""
        if not self.sharded:
            if self.world.main:
                self.model.save_pretrained(directory)
            return
        state = get_model_state_dict(self.model, options=_WHOLE)  # collective; whole tensors on the first process
        if self.world.main:
            self._plain.load_state_dict(state)
            self._plain.save_pretrained(directory)

    @property
    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _validate(self, step: int) -> float:
        """Every process evaluates (FSDP's forward is collective); the first one saves a new best."""
        scored = self.ema.applied(self.model) if self.ema is not None else contextlib.nullcontext()
        with scored:
            with self._whole() as model:
                model.eval()
                with torch.no_grad():
                    value = float(self.evaluate(model))
                model.train()
            if self.best is None or value < self.best:
                self.best = value
                partial = self.best_dir.with_name("best.partial")
                if self.world.main:
                    shutil.rmtree(partial, ignore_errors=True)
                self._write_model(partial)
                if self.world.main:
                    (partial / "best.json").write_text(json.dumps({"step": step, "validation": value}) + "\n")
                    shutil.rmtree(self.best_dir, ignore_errors=True)
                    partial.rename(self.best_dir)
        return value

    def _save(self, step: int) -> None:
        """Every process gathers (weights, optimizer and EMA state are whole in the checkpoint, whatever the number
        of processes); the first one writes."""
        ema = self.ema.state_dict() if self.ema is not None else None
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=_WHOLE)
        partial = self.checkpoint_dir.with_name("last.partial")
        if self.world.main:
            shutil.rmtree(partial, ignore_errors=True)
        self._write_model(partial)
        if not self.world.main:
            return
        torch.save(
            {
                "step": step,
                "data": json.dumps(self.batches.state_dict()),
                "best": self.best,
                "ema": ema,
                "optimizer": optimizer,
                "scheduler": self.scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(),
                "numpy_rng": torch.tensor(np.random.get_state()[1].astype(np.int64)),
                "numpy_rng_pos": np.random.get_state()[2],
                "python_rng": torch.tensor(random.getstate()[1], dtype=torch.int64),
            },
            partial / "trainer_state.pt",
        )
        shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        partial.rename(self.checkpoint_dir)  # a kill leaves either the old checkpoint or the new one, never half

    def _load(self) -> int:
        state = torch.load(self.checkpoint_dir / "trainer_state.pt", weights_only=True)
        loaded = type(self.model).from_pretrained(self.checkpoint_dir)
        set_model_state_dict(self.model, loaded.state_dict(), options=_WHOLE)
        # a parameter the loss never used (EhrMamba's classifier in pretraining) has no optimizer state: not an error
        lenient = dataclasses.replace(_WHOLE, strict=False)
        set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"], options=lenient)
        self.scheduler.load_state_dict(state["scheduler"])
        self.batches.load_state_dict(json.loads(state["data"]))
        self.best = state["best"]
        if self.ema is not None:
            if state["ema"] is None:
                raise MedstateError(f"{self.checkpoint_dir} was trained without an EMA; resume with the same settings")
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(("MT19937", state["numpy_rng"].numpy().astype(np.uint32), state["numpy_rng_pos"], 0, 0.0))
        random.setstate((3, tuple(state["python_rng"].tolist()), None))
        return state["step"]


# checkpoints hold whole tensors keyed by parameter name, so that any number of processes, sharded or not, resumes
# from them; saving gathers them to the first process
_WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


class _LossModule(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch: Any) -> tuple[torch.Tensor, int]:
        return self.loss_fn(self.model, batch)


def _fusable(model: torch.nn.Module) -> bool:
    """Whether torch's fused AdamW (one kernel over all parameters; several times faster than the per-op
    foreach path on the CPU) can take the model's parameters: floating point, all on one CPU or CUDA device."""
    params = list(model.parameters())
    devices = {p.device for p in params}
    return (
        len(devices) == 1 and next(iter(devices)).type in ("cpu", "cuda") and all(p.is_floating_point() for p in params)
    )


def _to_device(batch: Any, device: torch.device) -> Any:
    """Tensors of a dict batch moved to the model's device (other batches are the loss function's business)."""
    if isinstance(batch, dict) and device.type != "cpu":
        return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return batch


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """The step a run's `checkpoints/last` was saved at, or 0 where there is none."""
    state_file = Path(checkpoint_dir) / "trainer_state.pt"
    if not state_file.is_file():
        return 0
    return int(torch.load(state_file, weights_only=True, mmap=True)["step"])  # mmap: the optimizer state stays on disk
