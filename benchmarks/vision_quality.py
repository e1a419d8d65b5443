"""Imaging quality, several seeds per model, same budget within a dataset: test metrics as means over seeds with a
95% t-interval across seeds (n = seeds), beside the MedMNIST v2 paper's ResNet-18 (28) where it has one.

Each run is `medstate.vision.run.fit` on a config of `data/demo/vision/` with the budget below (the configs hold the
full protocols; the budget shortens them to what 2 CPU cores allow in a session, and says so in the table), in a
worker process with one thread (two workers by default: the two cores). A finished run (its metrics.json under
`--out`, same settings) is read back, not rerun, so an interrupted study resumes; after a change to the code,
not the configs, delete `--out` to rerun. `--only` and `--models` rerun a part: the recorded results of the models
not run are kept from results/vision_quality.json.

    python benchmarks/vision_quality.py                      # ~145 min on 2 cores → results/vision_quality.md
    python benchmarks/vision_quality.py --only nuclei,brain  # some studies
    python benchmarks/vision_quality.py --models breastmnist-mamba-stem  # some models (config names)
    python benchmarks/vision_quality.py --quick              # 1 seed, a few steps, nothing written to results/
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "data" / "demo" / "vision"
RESULTS = Path(__file__).resolve().parent / "results"
SHARED = ROOT.parent / "shared" / "data" / "imaging"

# study → (title, prepared dataset or None, budget override, [(model name, config)], paper's ResNet-18 (28) figures)
STUDIES = {
    "nuclei": (
        "2D nuclei (StarDist image; train = left half, test = right half), 128² patches, batch 8; HD95 in pixels",
        "nuclei",
        {"steps": 80},
        [("U-Mamba-style", "nuclei-umamba"), ("CNN U-Net", "nuclei-unet"), ("SwinUNETR", "nuclei-swinunetr")],
        None,
    ),
    "brain": (
        "3D brain T1 (ITK; train = left hemisphere, test = right; k-means tissue labels = silver standard), "
        "64×64×32 patches, batch 1; HD95 in mm (2×2×3 mm voxels)",
        "brain",
        {"steps": 150},
        [("U-Mamba-style", "brain-umamba"), ("CNN U-Net", "brain-unet"), ("SwinUNETR", "brain-swinunetr")],
        None,
    ),
    "breastmnist": (
        "BreastMNIST (28×28; 546 train / 78 val / 156 test), MedMNIST v2 protocol shortened to 20 epochs",
        None,
        {"epochs": 20},
        [
            ("Vision Mamba (tiny)", "breastmnist-mamba"),
            ("Vision Mamba + conv stem", "breastmnist-mamba-stem"),
            ("ResNet-18 (28)", "breastmnist-resnet18"),
        ],
        {"auc": 0.901, "accuracy": 0.863},
    ),
    "pneumoniamnist": (
        "PneumoniaMNIST (28×28; our copy: 3,882 train of 4,708, 826 normal images missing / 524 val / 624 test), "
        "MedMNIST v2 protocol shortened to 2 epochs",
        None,
        {"epochs": 2},
        [
            ("Vision Mamba (tiny)", "pneumoniamnist-mamba"),
            ("Vision Mamba + conv stem", "pneumoniamnist-mamba-stem"),
            ("ResNet-18 (28)", "pneumoniamnist-resnet18"),
        ],
        {"auc": 0.944, "accuracy": 0.854},
    ),
}
QUICK_BUDGET = {"steps": 4, "epochs": 1}


def prepare(dataset: str) -> None:
    from medstate.vision.data import PREPARERS

    out = ROOT / "runs" / "vision" / f"{dataset}-data"
    if not (out / "test").exists():
        preparer, source = PREPARERS[dataset]
        preparer(SHARED / source, out)


def run_one(config_name: str, overrides: dict, run_dir: str) -> dict:
    """One training run in this (worker) process; its metrics.json's content without the history."""
    from medstate.vision.config import config_dict, load_run_config
    from medstate.vision.run import fit

    config = load_run_config(
        CONFIGS / f"{config_name}.yaml", {f"train.{k}": v for k, v in {**overrides, "threads": 1}.items()}
    )
    settings = Path(run_dir) / "settings.json"  # written after metrics.json: the run finished
    if settings.exists() and json.loads(settings.read_text()) == config_dict(config):
        return json.loads((Path(run_dir) / "metrics.json").read_text())
    metrics = fit(config, run_dir)
    settings.write_text(json.dumps(config_dict(config)))
    return metrics


def summary_of(metrics: dict) -> dict:
    """The figures a table shows for one run."""
    test = metrics["test"]
    last_loss = metrics["history"][-1]["train_loss"]
    out = {"seconds_per_step": metrics["seconds_per_step"], "train_loss": last_loss, "backend": metrics["backend"]}
    if metrics["task"] == "classification":
        selected = next(e for e in metrics["history"] if e["epoch"] == metrics["selected_epoch"])
        out.update(
            auc=test["auc"]["value"],
            auc_bootstrap=[test["auc"]["low"], test["auc"]["high"]],
            accuracy=test["accuracy"]["value"],
            val_loss=selected.get("val_loss"),
            selected_epoch=metrics["selected_epoch"],
        )
    else:
        figures = test["summary"]
        classes = sorted(int(k.split("_")[1]) for k in figures if k.startswith("dice_") and k != "dice_mean")
        dices = [figures[f"dice_{c}"] for c in classes]
        hd95 = [figures[f"hd95_{c}"] for c in classes]
        out.update(
            dice=statistics.mean(d for d in dices if d is not None),
            hd95=statistics.mean(h for h in hd95 if h is not None) if any(h is not None for h in hd95) else None,
            **{f"dice_{c}": figures[f"dice_{c}"] for c in classes},
        )
        if "instance_f1" in figures:
            out["instance_f1"] = figures["instance_f1"]
    return out


def across_seeds(values: list[float], at_most_one: bool) -> str:
    """mean [95% t-interval over seeds], clipped to the metric's range (≥ 0; ≤ 1 for fractions); the mean alone
    with one seed."""
    from scipy import stats

    values = [v for v in values if v is not None]
    if not values:
        return "undefined"
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.3f}"
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5
    high = min(mean + half, 1.0) if at_most_one else mean + half
    return f"{mean:.3f} [{max(mean - half, 0.0):.3f}, {high:.3f}]"


UNBOUNDED = ("hd95", "train_loss", "val_loss")
COLUMNS = {
    "classification": [("auc", "test AUC"), ("accuracy", "test ACC"), ("val_loss", "val loss (selected epoch)")],
    "segmentation": [("dice", "Dice (mean over classes)"), ("hd95", "HD95 (mean over classes)")],
}


def table(name: str, runs: dict, budget: dict) -> list[str]:
    title, _, _, models, paper = STUDIES[name]
    done = {model: runs.get(model, []) for model, _ in models}
    first = next((rows for rows in done.values() if rows), None)
    if first is None:
        return []
    task = "classification" if "auc" in first[0] else "segmentation"
    columns = list(COLUMNS[task])
    if "instance_f1" in first[0]:
        columns.append(("instance_f1", "instance F1"))
    if task == "segmentation" and "dice_2" in first[0]:
        columns += [(k, f"Dice class {k[5:]}") for k in sorted(first[0]) if k.startswith("dice_")]
    columns.append(("train_loss", "final train loss"))  # speed: benchmarks/vision.py (two workers share the cores here)
    budget_text = ", ".join(f"{k} {v}" for k, v in budget.items())
    lines = [f"### {title}", "", f"Budget per run: {budget_text}.", ""]
    lines.append("| model | seeds | " + " | ".join(label for _, label in columns) + " |")
    lines.append("|---|---|" + "---|" * len(columns))
    for model, _ in models:
        rows = done[model]
        if rows:
            cells = [across_seeds([r.get(key) for r in rows], key not in UNBOUNDED) for key, _ in columns]
            lines.append(f"| {model} | {len(rows)} | " + " | ".join(cells) + " |")
    if paper:
        cells = [f"{paper[key]:.3f}" if key in paper else "-" for key, _ in columns]
        lines.append("| MedMNIST v2 paper: ResNet-18 (28), 100 epochs | - | " + " | ".join(cells) + " |")
    if task == "classification":
        test_set = [
            f"{m} [{r[0]['auc_bootstrap'][0]:.3f}, {r[0]['auc_bootstrap'][1]:.3f}]" for m, r in done.items() if r
        ]
        lines += [
            "",
            "Test-set 95% bootstrap interval of one run's AUC (images resampled): " + "; ".join(test_set) + ".",
        ]
    backends = [f"{model}: {rows[0]['backend']}" for model, rows in done.items() if rows]
    lines += ["", f"Backend: {'; '.join(backends)}.", ""]
    return lines


def report(runs: dict, seeds: int, budgets: dict) -> str:
    lines = [
        "# Imaging quality (`python benchmarks/vision_quality.py`)",
        "",
        f"{seeds} seeds per model; cells: mean over seeds [95% t-interval across seeds]. Test split of each dataset;",
        "classifiers are tested at the epoch with the best validation AUC. Losses are losses (cross-entropy;",
        "Dice + cross-entropy for segmentation), lower is better.",
        "",
    ]
    for name in STUDIES:
        lines += table(name, runs.get(name, {}), budgets.get(name, {}))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated studies: " + ", ".join(STUDIES))
    parser.add_argument("--models", help="comma-separated config names (default: every model of the studies)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "vision-quality")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(STUDIES)
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        parser.error(f"unknown studies {unknown}; choose from {', '.join(STUDIES)}")
    chosen = set(args.models.split(",")) if args.models else None
    configs = {config for _, _, _, models, _ in STUDIES.values() for _, config in models}
    if chosen and chosen - configs:
        parser.error(f"unknown models {sorted(chosen - configs)}; choose from {', '.join(sorted(configs))}")
    seeds = 1 if args.quick else args.seeds
    out = args.out / "quick" if args.quick else args.out
    jobs, budgets = [], {name: budget for name, (_, _, budget, _, _) in STUDIES.items()}
    for name in names:
        _, dataset, budget, models, _ = STUDIES[name]
        models = [(model, config) for model, config in models if chosen is None or config in chosen]
        if dataset and models:
            prepare(dataset)
        overrides = budgets[name] = {k: QUICK_BUDGET[k] for k in budget} if args.quick else budget
        for seed in range(seeds):
            for model, config in models:
                jobs.append(
                    (name, model, config, {**overrides, "seed": seed}, str(out / name / f"{config}-seed{seed}"))
                )
    recorded = RESULTS / "vision_quality.json"
    runs = {} if args.quick or not recorded.exists() else json.loads(recorded.read_text())
    for name, model, *_ in jobs:  # what runs now replaces what was recorded
        runs.setdefault(name, {})[model] = []
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.workers, mp_context=context) as pool:
        futures = {
            pool.submit(run_one, config, overrides, run_dir): (name, model)
            for name, model, config, overrides, run_dir in jobs
        }
        for future in as_completed(futures):
            name, model = futures[future]
            summary = summary_of(future.result())
            runs[name][model].append(summary)
            print(f"{name} / {model}: {json.dumps(summary)}", flush=True)
            if not args.quick:  # after every run, so that an interrupted study keeps what it measured
                recorded.write_text(json.dumps(runs, indent=2))
                (RESULTS / "vision_quality.md").write_text(report(runs, seeds, budgets))
    print(report(runs, seeds, budgets))


if __name__ == "__main__":
    main()
