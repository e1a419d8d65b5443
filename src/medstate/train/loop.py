"""A small training loop with exact resume.

AdamW, linear warmup then cosine/linear decay (or constant), gradient clipping, optional bf16 autocast, seeds.
Every `save_every` steps the loop writes `checkpoints/last/`: the model (safetensors, via the model's
`save_pretrained`), the optimizer and schedule (`trainer_state.pt`, tensors and plain data only, read back with
`weights_only=True`) and the RNG states. A run directory that holds a checkpoint resumes from it, and the run then
ends exactly as an uninterrupted one: batch order comes from (seed, epoch), so the data position is a number, and
dropout comes from the restored torch RNG.

Logs: `log.csv` (step, loss, learning rate, tokens, seconds) and, when tensorboard is installed, `tensorboard/`.
"""

from __future__ import annotations

import csv
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from medstate.errors import MedstateError


@dataclass
class TrainConfig:
    max_steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 20
    schedule: str = "cosine"  # cosine | linear | constant (after warmup)
    grad_clip: float = 1.0
    seed: int = 0
    bf16: bool = False
    save_every: int = 50
    log_every: int = 10
    # flush subnormal floats to zero on CPU while training: gradients that decay along a long history fall into the
    # subnormal range, where CPU arithmetic is 10-50x slower (a 16k-token EhrMamba step: 3x faster with it)
    flush_denormal: bool = True


def learning_rate_factor(step: int, config: TrainConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    progress = min(1.0, progress)
    if config.schedule == "linear":
        return 1.0 - progress
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise MedstateError(f"unknown schedule {config.schedule!r}; choose cosine, linear or constant")


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


class Trainer:
    """`batches(epoch)` yields the batches of one epoch (its order must depend only on the seed and the epoch);
    `loss_fn(model, batch)` returns (loss, tokens)."""

    def __init__(
        self,
        model: torch.nn.Module,
        loss_fn: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, int]],
        batches: Callable[[int], list],
        config: TrainConfig,
        run_dir: str | Path,
        progress: Callable[[int, int, float], None] | None = None,
    ):
        self.model, self.loss_fn, self.batches, self.config = model, loss_fn, batches, config
        self.run_dir = Path(run_dir)
        self.progress = progress or (lambda step, total, loss: None)
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
        no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=config.lr,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: learning_rate_factor(s, config))

    @property
    def checkpoint_dir(self) -> Path:
        return self.run_dir / "checkpoints" / "last"

    def fit(self) -> TrainResult:
        if not self.config.flush_denormal:
            return self._fit()
        torch.set_flush_denormal(True)
        try:
            return self._fit()
        finally:
            torch.set_flush_denormal(False)  # torch's default: leave the process as we found it

    def _fit(self) -> TrainResult:
        started = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "train_config.yaml").write_text(yaml.safe_dump(asdict(self.config)))
        seed_everything(self.config.seed)
        step, epoch, index = 0, 0, 0
        resumed = None
        if checkpoint_step(self.checkpoint_dir):  # the one test of "resume or start" (ehr.training.start_model too)
            step, epoch, index = self._load()
            resumed = step
        log = _Log(self.run_dir, append=resumed is not None, step=step)
        last_loss = float("nan")
        self.model.train()
        while step < self.config.max_steps:
            epoch_batches = self.batches(epoch)
            if not epoch_batches:
                raise MedstateError("no training batches: the training split is empty")
            for batch in _from(epoch_batches, index):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.config.bf16):
                    loss, tokens = self.loss_fn(self.model, batch)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
                self.optimizer.step()
                self.scheduler.step()
                step += 1
                index += 1
                last_loss = float(loss.detach())
                log.add(step, last_loss, self.scheduler.get_last_lr()[0], tokens)
                self.progress(step, self.config.max_steps, last_loss)
                if step % self.config.save_every == 0 or step == self.config.max_steps:
                    log.flush()
                    self._save(step, epoch, index)
                if step >= self.config.max_steps:
                    break
            else:
                epoch, index = epoch + 1, 0
        log.close()
        return TrainResult(step, last_loss, resumed, time.perf_counter() - started)

    def _save(self, step: int, epoch: int, index: int) -> None:
        partial = self.checkpoint_dir.with_name("last.partial")
        shutil.rmtree(partial, ignore_errors=True)
        self.model.save_pretrained(partial)
        torch.save(
            {
                "step": step,
                "epoch": epoch,
                "index": index,
                "optimizer": self.optimizer.state_dict(),
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

    def _load(self) -> tuple[int, int, int]:
        state = torch.load(self.checkpoint_dir / "trainer_state.pt", weights_only=True)
        loaded = type(self.model).from_pretrained(self.checkpoint_dir)
        self.model.load_state_dict(loaded.state_dict())
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(("MT19937", state["numpy_rng"].numpy().astype(np.uint32), state["numpy_rng_pos"], 0, 0.0))
        random.setstate((3, tuple(state["python_rng"].tolist()), None))
        return state["step"], state["epoch"], state["index"]


def checkpoint_step(checkpoint_dir: str | Path) -> int:
    """The step a run's `checkpoints/last` was saved at, or 0 where there is none."""
    state_file = Path(checkpoint_dir) / "trainer_state.pt"
    if not state_file.is_file():
        return 0
    return int(torch.load(state_file, weights_only=True, mmap=True)["step"])  # mmap: the optimizer state stays on disk


def _from(batches: list, index: int) -> Iterator:
    yield from batches[index:]


class _Log:
    """log.csv (and TensorBoard when installed). On resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, run_dir: Path, append: bool, step: int):
        self.path = run_dir / "log.csv"
        rows = []
        if append and self.path.is_file():
            with open(self.path) as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        self.handle = open(self.path, "w", newline="")  # noqa: SIM115 (open for the whole run, closed in close())
        self.writer = csv.DictWriter(self.handle, fieldnames=["step", "loss", "lr", "tokens", "seconds"])
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.started = time.perf_counter()
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(run_dir / "tensorboard", purge_step=step + 1 if append else None)
        except ImportError:
            self.tensorboard = None

    def add(self, step: int, loss: float, lr: float, tokens: int) -> None:
        seconds = round(time.perf_counter() - self.started, 3)
        self.writer.writerow(
            {"step": step, "loss": f"{loss:.6f}", "lr": f"{lr:.3e}", "tokens": tokens, "seconds": seconds}
        )
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("loss", loss, step)
            self.tensorboard.add_scalar("lr", lr, step)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
