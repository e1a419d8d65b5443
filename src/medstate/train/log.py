"""The training log: `log.csv` (step, loss, learning rate, tokens, seconds, validation) and, when tensorboard is
installed, `tensorboard/`; written by the first process only."""

from __future__ import annotations

import csv
import time
from pathlib import Path


class NoLog:
    """The log of a process other than the first: nothing is written."""

    def add(self, *args) -> None: ...
    def add_validation(self, *args) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class TrainLog:
    """log.csv (and TensorBoard when installed). On resume, rows after the checkpoint's step are dropped first."""

    def __init__(self, run_dir: Path, append: bool, step: int):
        self.path = run_dir / "log.csv"
        rows = []
        if append and self.path.is_file():
            with open(self.path) as handle:
                rows = [r for r in csv.DictReader(handle) if int(r["step"]) <= step]
        self.handle = open(self.path, "w", newline="")  # noqa: SIM115 (open for the whole run, closed in close())
        self.writer = csv.DictWriter(
            self.handle, fieldnames=["step", "loss", "lr", "tokens", "seconds", "validation"], restval=""
        )
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

    def add_validation(self, step: int, value: float) -> None:
        self.writer.writerow({"step": step, "validation": f"{value:.6f}"})
        if self.tensorboard is not None:
            self.tensorboard.add_scalar("validation", value, step)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
