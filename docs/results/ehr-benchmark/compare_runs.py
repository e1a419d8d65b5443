"""Held-out AUROC and AUPRC before and after a change, per task and model, from two predictions files: one seed,
or the mean over several seeds.

python docs/results/ehr-benchmark/compare_runs.py OLD.parquet NEW.parquet [SEEDS]     # SEEDS: 0 or 0,1,2
"""

import sys

import numpy as np
import polars as pl

from medstate.eval.metrics import auroc, average_precision


def scores(path: str, seeds: list[int]) -> dict:
    """(task, model) -> (n, positives, mean AUROC, mean AUPRC) over `seeds` (None where a seed leaves it undefined)."""
    frame = pl.read_parquet(path).filter(pl.col("seed").is_in(seeds) & (pl.col("split") == "held_out"))
    per_seed: dict = {}
    for (task, model, seed), group in frame.group_by("task", "model", "seed"):
        y, s = group["y_true"].to_numpy(), group["y_score"].to_numpy()
        per_seed.setdefault((task, model), {})[seed] = (len(y), int(y.sum()), auroc(y, s), average_precision(y, s))
    out = {}
    for key, by_seed in per_seed.items():
        if sorted(by_seed) != sorted(seeds):
            continue
        values = list(by_seed.values())
        a = [v[2] for v in values]
        r = [v[3] for v in values]
        out[key] = (
            values[0][0],
            values[0][1],
            None if None in a else float(np.mean(a)),
            None if None in r else float(np.mean(r)),
        )
    return out


def cell(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def main(old_path: str, new_path: str, seeds: list[int]) -> None:
    old, new = scores(old_path, seeds), scores(new_path, seeds)
    which = f"seed {seeds[0]}" if len(seeds) == 1 else f"mean of seeds {', '.join(map(str, seeds))}"
    columns = ["task", "model", "n (pos) before", "n (pos) after", f"AUROC before ({which})", "AUROC after", "Δ"]
    print("| " + " | ".join([*columns, "AUPRC before", "AUPRC after"]) + " |")
    print("|---" * 9 + "|")
    deltas = []
    for key in sorted(set(old) & set(new)):
        (n0, p0, a0, r0), (n1, p1, a1, r1) = old[key], new[key]
        delta = None if a0 is None or a1 is None else a1 - a0
        deltas.append(delta)
        print(
            f"| {key[0]} | {key[1]} | {n0} ({p0}) | {n1} ({p1}) | {cell(a0)} | {cell(a1)} | "
            f"{'undefined' if delta is None else f'{delta:+.3f}'} | {cell(r0)} | {cell(r1)} |"
        )
    defined = [d for d in deltas if d is not None]
    print(
        f"\nmean AUROC change over {len(defined)} cells: {np.mean(defined):+.3f}; "
        f"median {np.median(defined):+.3f}; largest {max(defined, key=abs):+.3f}"
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], [int(s) for s in (sys.argv[3] if len(sys.argv) > 3 else "0").split(",")])
