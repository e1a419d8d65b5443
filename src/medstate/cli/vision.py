"""`medstate vision`: image and volume models — classification, segmentation, bags (`medstate.vision`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from medstate.cli.common import steps as steps_bar
from medstate.cli.common import summary
from medstate.eval.metrics import format_interval
from medstate.vision.config import load_run_config
from medstate.vision.data import prepare_dataset
from medstate.vision.run import evaluate_saved, fit, predict_files

app = typer.Typer(no_args_is_help=True, add_completion=False)


def _vision_summary(title: str, metrics: dict, where: Path) -> None:
    test = metrics["test"]
    rows = {"model": metrics["model"], "backend": f"{metrics['backend']} ({metrics['device']})"}
    if metrics["task"] != "segmentation":
        for name in ("auc", "accuracy"):
            rows[name] = format_interval(test[name], undefined="undefined")
    else:
        rows.update({k: "undefined" if v is None else round(v, 4) for k, v in test["summary"].items()})
    rows["report"] = str(where / "report.md")
    summary(title, rows)


@app.command("train")
def vision_train(
    config: Annotated[Path, typer.Argument(help="run YAML: data, model (kind: vision-mamba, umamba, ...), train")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (config, model/, metrics.json, report.md)")],
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="override train.epochs (classification)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="override train.steps (segmentation)")] = None,
    require_kernels: Annotated[
        bool, typer.Option(help="refuse to run unless the fused CUDA kernels (mamba-ssm) are in use")
    ] = False,
) -> None:
    """Train a classifier, a segmenter or a bag classifier (MambaMIL); test the selected model; write the run."""

    settings = load_run_config(config, {"train.seed": seed, "train.epochs": epochs, "train.steps": steps})
    with steps_bar("train") as progress:
        metrics = fit(settings, run_dir, progress, require_fused=require_kernels)
    _vision_summary("vision train", metrics, run_dir)


@app.command("evaluate")
def vision_evaluate(
    model_dir: Annotated[Path, typer.Argument(help="a vision model directory (a run's model/)")],
    config: Annotated[Path, typer.Argument(help="run YAML naming the data (its train settings set the inference)")],
    out: Annotated[Path, typer.Argument(help="folder for metrics.json, predictions and report.md")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
) -> None:
    """Score a saved model on a split of a dataset."""

    metrics = evaluate_saved(model_dir, load_run_config(config), split, out)
    _vision_summary(f"vision evaluate ({split})", metrics, out)


@app.command("predict")
def vision_predict(
    model_dir: Annotated[Path, typer.Argument(help="a vision model directory (a run's model/)")],
    images: Annotated[list[Path], typer.Argument(help="image or volume files (PNG, TIFF, NIfTI, NPY); bags (NPY, PT)")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("predictions"),
) -> None:
    """Predict new images or bags: class probabilities (predictions.csv) or one mask file per image."""

    written = predict_files(model_dir, images, out)
    summary("vision predict", {"images": len(images), "written": str(written)})


@app.command("prepare")
def vision_prepare(
    dataset: Annotated[str, typer.Argument(help="nuclei (StarDist 2D) or brain (ITK T1 with k-means tissues)")],
    source: Annotated[Path, typer.Argument(help="the folder holding the shared files")],
    out: Annotated[Path, typer.Argument(help="dataset folder to write (train/, test/)")],
) -> None:
    """Write a shared example in the folder layout `vision train` reads."""

    summary("vision prepare", {"dataset": dataset, "written": str(prepare_dataset(dataset, source, out))})
