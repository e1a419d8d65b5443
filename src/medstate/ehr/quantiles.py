"""Exact per-group quantiles of a column too large to hold: selection by narrowing value windows, pass by pass.

A linear quantile q of n sorted values is v[⌊h⌋] + (h − ⌊h⌋)(v[⌈h⌉] − v[⌊h⌋]) with h = q(n − 1) (numpy's default and
polars' "linear"), so it needs two order statistics. Each is found without sorting: a first streaming pass counts
each group's values and their range; every later pass splits each target's current window [lo, hi] into `buckets`
equal parts, counts the values in each part (with their min and max) and keeps the part that holds the target's rank.
A window that holds one value, or few enough values to gather (`gather` in all), ends the search. Memory is the
counts (groups × buckets at most), not the rows; a pass reads only the two columns, streaming. Values that are
spread extremely unevenly (a dense cluster inside a huge range) take more passes; after `max_passes` the remaining
windows are gathered whatever their size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl


@dataclass
class _Target:
    group: str
    rank: int  # 0-based rank among the group's sorted values
    lo: float  # the window that holds it: lo <= value <= hi
    hi: float
    below: int  # how many of the group's values are < lo
    count: int  # how many are in [lo, hi]
    value: float | None = None


def exact_quantiles(
    frame: pl.LazyFrame,
    by: str,
    column: str,
    quantiles: list[float],
    buckets: int = 1024,
    gather: int = 2_000_000,
    max_passes: int = 8,
    progress: Callable[[int, None], None] | None = None,
) -> dict[str, list[float]]:
    """{group: [linear quantile of `column` at each q]} over the rows of `frame` (nulls and non-finite values
    must be filtered out before); equal to polars' `quantile(q, "linear")` per group, which interpolates in the
    column's own precision (a Float32 column's quantiles are rounded to float32, as here). `progress(passes, None)`
    after each pass (how many it takes depends on the values)."""
    progress = progress or (lambda done, total: None)
    rounded = np.float32 if frame.collect_schema()[column] == pl.Float32 else float
    values = frame.select(pl.col(by), pl.col(column).cast(pl.Float64))
    stats = values.group_by(by).agg(pl.len().alias("n"), pl.col(column).min().alias("lo"),
                                    pl.col(column).max().alias("hi"))  # fmt: skip
    targets: dict[tuple[str, int], _Target] = {}
    positions: dict[str, list[tuple[int, int, float]]] = {}  # group → per q: (rank ⌊h⌋, rank ⌈h⌉, h − ⌊h⌋)
    counted = stats.collect(engine="streaming")
    progress(1, None)
    for group, n, lo, hi in counted.iter_rows():
        positions[group] = []
        for q in quantiles:
            h = q * (n - 1)
            low, high = math.floor(h), math.ceil(h)
            positions[group].append((low, high, h - low))
            for rank in (low, high):
                targets.setdefault((group, rank), _Target(group, rank, lo, hi, 0, n))
    for done in range(max_passes + 1):
        for target in targets.values():
            if target.value is None and target.lo == target.hi:
                target.value = target.lo
        open_ = [t for t in targets.values() if t.value is None]
        if not open_:
            break
        windows = {(t.group, t.lo, t.hi): t.count for t in open_}
        if sum(windows.values()) <= gather or done == max_passes:
            _gather(values, by, column, open_)
            progress(done + 2, None)
            break
        _narrow(values, by, column, open_, buckets)
        progress(done + 2, None)
    return {
        group: [float(rounded(_interpolate(targets[group, low].value, targets[group, high].value, fraction)))
                for low, high, fraction in ranks]
        for group, ranks in sorted(positions.items())
    }  # fmt: skip


def _interpolate(lower: float, upper: float, fraction: float) -> float:
    return lower if fraction == 0 else fraction * (upper - lower) + lower


def _window_table(by: str, targets: list[_Target]) -> tuple[pl.LazyFrame, dict[tuple, int]]:
    ids: dict[tuple, int] = {}
    for t in targets:
        ids.setdefault((t.group, t.lo, t.hi), len(ids))
    table = pl.DataFrame(
        [(i, g, lo, hi) for (g, lo, hi), i in ids.items()],
        schema={"_window": pl.Int64, by: pl.String, "_lo": pl.Float64, "_hi": pl.Float64},
        orient="row",
    )
    return table.lazy(), ids


def _in_windows(values: pl.LazyFrame, by: str, column: str, table: pl.LazyFrame) -> pl.LazyFrame:
    joined = values.with_columns(pl.col(by).cast(pl.String)).join(table, on=by, how="inner")
    return joined.filter(pl.col(column).is_between(pl.col("_lo"), pl.col("_hi")))


def _narrow(values: pl.LazyFrame, by: str, column: str, targets: list[_Target], buckets: int) -> None:
    """One pass: each window in `buckets` parts; each target keeps the part that holds its rank."""
    table, ids = _window_table(by, targets)
    # halves first, so that the width of a window spanning most of the float range does not overflow; monotone in
    # the value, so the parts are in value order
    part = ((pl.col(column) / 2 - pl.col("_lo") / 2) / (pl.col("_hi") / 2 - pl.col("_lo") / 2) * buckets).floor()
    counted = (
        _in_windows(values, by, column, table)
        .group_by("_window", part.clip(0, buckets - 1).cast(pl.Int64).alias("_part"))
        .agg(pl.len().alias("n"), pl.col(column).min().alias("lo"), pl.col(column).max().alias("hi"))
        .sort("_window", "_part")
        .collect(engine="streaming")
    )
    parts: dict[int, list[tuple[int, float, float]]] = {}
    for window, _, n, lo, hi in counted.iter_rows():
        parts.setdefault(window, []).append((n, lo, hi))
    for t in targets:
        below = t.below
        for n, lo, hi in parts[ids[t.group, t.lo, t.hi]]:
            if t.rank < below + n:
                t.lo, t.hi, t.below, t.count = lo, hi, below, n
                break
            below += n


def _gather(values: pl.LazyFrame, by: str, column: str, targets: list[_Target]) -> None:
    """The last pass: the values of every open window, sorted; each target's by its rank in its window."""
    table, ids = _window_table(by, targets)
    rows = _in_windows(values, by, column, table).select("_window", column).collect(engine="streaming")
    sorted_values = {
        window: frame[column].sort().to_list()
        for (window,), frame in rows.partition_by("_window", as_dict=True).items()
    }
    for t in targets:
        t.value = sorted_values[ids[t.group, t.lo, t.hi]][t.rank - t.below]
