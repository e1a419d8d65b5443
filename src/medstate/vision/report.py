"""A run's predictions and report: predictions.csv (classification; for bags also attention/NAME.csv, each
instance's attention weight beside its coordinates) or one mask file per image (TIFF for 2D, NIfTI for 3D, with the
image's spacing), and report.md with the metrics and pictures (ROC curve; for
segmentation, the image's middle slice with the true and predicted boundaries)."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from medstate.eval.metrics import format_interval
from medstate.vision.data import ImageSet, write_array
from medstate.vision.mil import BagPredictions
from medstate.vision.models import ModelSpec

MAX_OVERLAYS = 4


def _mask_name(name: str, ndim: int) -> str:
    stem = name[: -len(".nii.gz")] if name.endswith(".nii.gz") else name.rsplit(".", 1)[0]
    return f"{stem}.nii.gz" if ndim == 3 else f"{stem}.tif"


def _write_attention(folder: Path, data: ImageSet, attention: list[np.ndarray]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, weights) in enumerate(zip(data.names, attention)):
        coords = data.coords[i] if data.coords else None
        axes = [f"coord{k}" for k in range(coords.shape[1])] if coords is not None else []
        with (folder / f"{name.rsplit('.', 1)[0]}.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["instance", *axes, "attention"])
            for j, weight in enumerate(weights):
                writer.writerow([j, *(coords[j].tolist() if coords is not None else []), f"{weight:.6g}"])


def write_predictions(run_dir: Path, spec: ModelSpec, data: ImageSet, predictions) -> Path:
    if isinstance(predictions, BagPredictions):
        _write_attention(run_dir / "attention", data, predictions.attention)
        predictions = predictions.probabilities
    if spec.task != "segmentation":
        path = run_dir / "predictions.csv"
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            item = "bag" if data.bags else "image"
            writer.writerow([item, "label", "predicted", *(f"p{k}" for k in range(predictions.shape[1]))])
            for name, label, row in zip(data.names, data.labels, predictions):
                writer.writerow([name, int(label), int(row.argmax()), *(f"{p:.6g}" for p in row)])
        return path
    folder = run_dir / "predictions"
    for i, (name, mask) in enumerate(zip(data.names, predictions)):
        spacing = data.spacing[i] if data.spacing else None
        write_array(folder / _mask_name(name, mask.ndim), mask.astype(np.uint8), spacing)
    return folder


def _middle_slice(array: np.ndarray) -> np.ndarray:
    return array if array.ndim == 2 else array[:, :, array.shape[2] // 2]


def _overlay(path: Path, image: np.ndarray, truth: np.ndarray, predicted: np.ndarray, title: str) -> None:
    figure, axis = plt.subplots(figsize=(5, 5))
    axis.imshow(_middle_slice(image[0]), cmap="gray")
    labels = [v for v in np.unique(truth) if v] or [1]
    for label in labels:
        for mask, colour in ((truth, "lime"), (predicted, "red")):
            plane = _middle_slice(mask) == label
            if plane.any() and not plane.all():
                axis.contour(plane.astype(float), levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_title(f"{title}\ngreen: truth, red: prediction", fontsize=9)
    axis.axis("off")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def _roc(path: Path, labels: np.ndarray, scores: np.ndarray) -> None:
    order = np.argsort(-scores, kind="stable")
    hits = labels[order] == 1
    tpr = np.concatenate([[0], np.cumsum(hits) / max(1, hits.sum())])
    fpr = np.concatenate([[0], np.cumsum(~hits) / max(1, (~hits).sum())])
    figure, axis = plt.subplots(figsize=(4, 4))
    axis.plot(fpr, tpr)
    axis.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)


def write_report(run_dir: Path, spec: ModelSpec, metrics: dict, data: ImageSet, predictions) -> Path:
    lines = [
        f"# {spec.kind} ({spec.task})",
        "",
        f"- parameters: {metrics['parameters']:,}; backend: {metrics['backend']} on {metrics['device']}",
        f"- training: {metrics['train_seconds']:.1f} s, {metrics['seconds_per_step']:.3f} s per step",
        "",
    ]
    test = metrics["test"]
    if isinstance(predictions, BagPredictions):
        predictions = predictions.probabilities
    if spec.task != "segmentation":
        items = "bags" if data.bags else "images"
        lines += [
            f"Test ({test['n']} {items}): AUC {format_interval(test['auc'], undefined='undefined')}, "
            f"accuracy {format_interval(test['accuracy'], undefined='undefined')} "
            f"(95% intervals: bootstrap over {items} for AUC, Wilson for accuracy).",
            "",
        ]
        if predictions.shape[1] == 2 and len(set(data.labels.tolist())) == 2:
            _roc(run_dir / "roc.png", data.labels, predictions[:, 1])
            lines += ["![ROC curve](roc.png)", ""]
    else:
        lines += ["| metric | mean over test images |", "|---|---|"]
        lines += [f"| {k} | {'undefined' if v is None else f'{v:.4f}'} |" for k, v in test["summary"].items()]
        lines.append("")
        for i, (name, image, truth, predicted) in enumerate(zip(data.names, data.images, data.masks, predictions)):
            if i == MAX_OVERLAYS:
                break
            picture = f"overlay-{i}.png"
            _overlay(run_dir / picture, image, truth, predicted, name)
            lines += [f"![{name}]({picture})", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
