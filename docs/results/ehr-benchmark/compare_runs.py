"""Held-out AUROC and AUPRC of one seed before and after a change, per task and model, from two predictions files.

python docs/results/ehr-benchmark/compare_runs.py OLD.parquet NEW.parquet [SEED]
"""

import sys

import numpy as np
import polars as pl

from medstate.eval.metrics import auroc, average_precision


def scores(path: str, seed: int) -> dict:
    frame = pl.read_parquet(path).filter((pl.col("seed") == seed) & (pl.col("split") == "held_out"))
    out = {}
    for (task, model), group in frame.group_by("task", "model"):
        y, s = group["y_true"].to_numpy(), group["y_score"].to_numpy()
        out[(task, model)] = (len(y), int(y.sum()), auroc(y, s), average_precision(y, s))
    return out


def cell(value) -> str:
    return "undefined" if value is None else f"{value:.3f}"


def main(old_path: str, new_path: str, seed: int = 0) -> None:
    old, new = scores(old_path, seed), scores(new_path, seed)
    columns = ["task", "model", "n (pos) before", "n (pos) after", "AUROC before", "AUROC after", "Δ"]
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
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 0)
