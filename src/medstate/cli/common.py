"""What every sub-command shares: the console, one-screen summaries, progress bars."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console()


def summary(title: str, rows: dict) -> None:
    """A two-column table: names and values (floats to 4 significant digits)."""
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


def table(title: str, columns: list[str], rows: list[list[str]], left: int = 1) -> None:
    """A table with a header; the first `left` columns are left-aligned, the others right-aligned (numbers)."""
    shown = Table(title=title)
    for i, column in enumerate(columns):
        shown.add_column(column, justify="left" if i < left else "right")
    for row in rows:
        shown.add_row(*row)
    console.print(shown)


@contextlib.contextmanager
def counting(description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar for `progress(done, total)` callbacks (patients, samples, …)."""
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(description, total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


@contextlib.contextmanager
def stages() -> Iterator[Callable[[str, int, int | None], None]]:
    """One bar per stage for `progress(stage, done, total)` callbacks (total None: a count of unknown length), each
    added when its stage first reports and kept on screen once done, with its time."""
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.fields[shown]}"),
               TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns, console=console) as bar:
        tasks: dict[str, int] = {}

        def progress(stage: str, done: int, total: int | None) -> None:
            if stage not in tasks:
                for earlier in tasks.values():  # a new stage: the ones before it are over
                    finish(earlier)
                tasks[stage] = bar.add_task(stage, total=None, shown="?")
            bar.update(tasks[stage], completed=done, total=total, shown="?" if total is None else total)

        def finish(task: int) -> None:
            done = bar.tasks[task].completed
            bar.update(task, total=done, shown=int(done))

        yield progress
        for task in tasks.values():
            finish(task)


@contextlib.contextmanager
def spinner(description: str) -> Iterator[Callable[[str], None]]:
    """A spinner whose text the callback replaces (work of unknown length)."""
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task(description, total=None)
        yield lambda text: bar.update(task, description=text)


@contextlib.contextmanager
def steps(kind: str, remaining: bool = True) -> Iterator[Callable[[int, int, float], None]]:
    """A bar for training's `progress(step, total, loss)` callbacks."""
    columns = [TextColumn(kind), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}")]
    with Progress(*columns, *([TimeRemainingColumn()] if remaining else []), console=console, transient=True) as bar:
        task = bar.add_task(kind, total=None, loss="-")
        yield lambda step, total, loss: bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")


@contextlib.contextmanager
def token_steps(kind: str, total: int, tokens_per_step: int, show: bool = True):
    """A training bar with loss and tokens per second (row tokens: padding counts where there is any); `show`
    False under torchrun's other processes, so that one bar is drawn."""
    with Progress(
        TextColumn(kind), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(), console=console, transient=True,
        disable=not show,
    ) as bar:  # fmt: skip
        task = bar.add_task(kind, total=total, loss="-", rate="-")
        started, first = time.perf_counter(), []

        def progress(step: int, _total: int, loss: float) -> None:
            first.append(step - 1) if not first else None
            rate = (step - first[0]) * tokens_per_step / (time.perf_counter() - started)
            bar.update(task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:,.0f}")

        yield progress
