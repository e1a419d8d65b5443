"""From predictions to a report: metrics.json, report.md, report.html and plots/*.png.

`predictions` has one row per (model, seed, task, split, sample): subject_id, y_true, y_score (a probability).
Metrics are computed on the `held_out` split; the F1 threshold of each (model, seed, task) is chosen on its
`tuning` predictions. Several seeds are summarised as mean ± the sample standard deviation over seeds (n − 1 in
the denominator); a single seed shows its value with its subject-bootstrap 95% interval. Every seed's interval is
in metrics.json. A metric that is undefined (no positives, one class) says so instead of a number.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import polars as pl

from medstate.eval.metrics import N_BOOTSTRAP, evaluate_task, reliability_curve

PREDICTION_COLUMNS = ("subject_id", "task", "model", "seed", "split", "y_true", "y_score")
METRICS = ("auroc", "auprc", "f1")


def compute_metrics(predictions: pl.DataFrame, n_bootstrap: int = N_BOOTSTRAP) -> list[dict]:
    missing = [c for c in PREDICTION_COLUMNS if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions lack column(s) {missing}")
    rows = []
    for (model, seed, task), group in predictions.group_by("model", "seed", "task", maintain_order=True):
        test = group.filter(pl.col("split") == "held_out")
        tuning = group.filter(pl.col("split") == "tuning")
        result = evaluate_task(
            test["y_true"].to_numpy(),
            test["y_score"].to_numpy(),
            test["subject_id"].to_numpy(),
            tuning["y_true"].to_numpy(),
            tuning["y_score"].to_numpy(),
            n_bootstrap=n_bootstrap,
            seed=int(seed),
        )
        rows.append({"model": model, "seed": int(seed), "task": task, **asdict(result)})
    return sorted(rows, key=lambda r: (r["task"], r["model"], r["seed"]))


def summarise(rows: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (task, model); a metric undefined for every seed stays undefined."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["task"], row["model"]), []).append(row)
    summary = []
    for (task, model), members in sorted(groups.items()):
        entry = {
            "task": task,
            "model": model,
            "seeds": len(members),
            "n": members[0]["n"],
            "positives": members[0]["positives"],
        }
        for metric in METRICS:
            values = [m[metric]["value"] for m in members if m[metric]["value"] is not None]
            if not values:
                entry[metric] = {"mean": None, "std": None, "seeds_defined": 0, "status": members[0][metric]["status"]}
                continue
            entry[metric] = {
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,  # sample sd over seeds
                "seeds_defined": len(values),
            }
            if len(members) == 1:
                entry[metric] |= {"low": members[0][metric]["low"], "high": members[0][metric]["high"]}
        summary.append(entry)
    return summary


def _cell(entry: dict) -> str:
    if entry["mean"] is None:
        status = entry.get("status") or "undefined"
        return status if status.startswith("undefined") else f"undefined: {status}"
    if entry["std"] is not None:
        return f"{entry['mean']:.3f} ± {entry['std']:.3f}"
    if entry.get("low") is not None:
        return f"{entry['mean']:.3f} ({entry['low']:.3f}–{entry['high']:.3f})"
    return f"{entry['mean']:.3f}"


def markdown_table(summary: list[dict]) -> str:
    lines = ["| task | model | n (positives) | AUROC | AUPRC | F1 |", "|---|---|---|---|---|---|"]
    for e in summary:
        lines.append(
            f"| {e['task']} | {e['model']} | {e['n']} ({e['positives']}) | "
            + " | ".join(_cell(e[m]) for m in METRICS)
            + " |"
        )
    return "\n".join(lines)


def plot_task(predictions: pl.DataFrame, task: str, path: Path) -> Path:
    """ROC, precision-recall and reliability curves of every model (first seed) on the held-out split."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(13, 4))
    held_out = predictions.filter((pl.col("task") == task) & (pl.col("split") == "held_out"))
    for model, group in held_out.group_by("model", maintain_order=True):
        first = group.filter(pl.col("seed") == group["seed"].min())
        y, s = first["y_true"].to_numpy(), first["y_score"].to_numpy()
        if y.sum() == 0 or y.sum() == len(y):
            continue
        order = np.argsort(-s, kind="mergesort")
        tp, fp = np.cumsum(y[order]), np.cumsum(1 - y[order])
        axes[0].plot(np.r_[0, fp / fp[-1]], np.r_[0, tp / tp[-1]], label=str(model[0]))
        axes[1].plot(tp / tp[-1], tp / np.arange(1, len(y) + 1), label=str(model[0]))
        mean_score, observed, _ = reliability_curve(y, s)
        axes[2].plot(mean_score, observed, marker="o", label=str(model[0]))
    axes[0].plot([0, 1], [0, 1], color="grey", linestyle=":")
    axes[2].plot([0, 1], [0, 1], color="grey", linestyle=":")
    for axis, (title, xlabel, ylabel) in zip(
        axes,
        [("ROC", "false positive rate", "true positive rate"), ("precision-recall", "recall", "precision"),
         ("reliability", "mean predicted probability", "observed frequency")],
    ):  # fmt: skip
        axis.set(title=f"{task}: {title}", xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1.02))
        if axis.get_legend_handles_labels()[0]:
            axis.legend(loc="best", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_report(
    predictions: pl.DataFrame, out: str | Path, title: str = "medstate EHR report", n_bootstrap: int = N_BOOTSTRAP
) -> dict:
    """metrics.json, predictions.parquet, report.md, report.html (plots inline) and plots/<task>.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictions.write_parquet(out / "predictions.parquet")
    rows = compute_metrics(predictions, n_bootstrap)
    summary = summarise(rows)
    (out / "metrics.json").write_text(json.dumps({"per_seed": rows, "summary": summary}, indent=2) + "\n")
    tasks = sorted(predictions["task"].unique())
    plots = {task: plot_task(predictions, task, out / "plots" / f"{task}.png") for task in tasks}
    table = markdown_table(summary)
    note = (
        "Held-out split; F1 at the threshold that maximises F1 on the tuning split. Several seeds: mean ± sample "
        "standard deviation over seeds (n − 1); one seed: the value (subject-bootstrap 95% interval). "
        "Every seed's interval is in metrics.json."
    )
    (out / "report.md").write_text(
        f"# {title}\n\n{note}\n\n{table}\n\n" + "\n".join(f"![{t}](plots/{t}.png)" for t in tasks) + "\n"
    )
    images = "".join(
        f'<h3>{html.escape(t)}</h3><img alt="{html.escape(t)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode()}"/>'
        for t, p in plots.items()
    )
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}td:first-child,td:nth-child(2){text-align:left}"
        f"</style></head><body><h1>{html.escape(title)}</h1><p>{html.escape(note)}</p>{_html_table(summary)}"
        f"{images}</body></html>\n"
    )
    return {"per_seed": rows, "summary": summary}


def _html_table(summary: list[dict]) -> str:
    head = (
        "<tr>" + "".join(f"<th>{h}</th>" for h in ("task", "model", "n (positives)", "AUROC", "AUPRC", "F1")) + "</tr>"
    )
    body = "".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (e["task"], e["model"], f"{e['n']} ({e['positives']})", *(_cell(e[m]) for m in METRICS))
        )
        + "</tr>"
        for e in summary
    )
    return f"<table>{head}{body}</table>"
