"""Training runs for image classification, segmentation and bag classification (multiple-instance learning): one
YAML (data, model, train), one run directory.

    data:  {format: medmnist | folder | bags, path: ..., foreground_only: false, normalize: unit | zscore}
    model: {kind: vision-mamba | resnet18 | umamba | unet | swinunetr | mil, num_classes: ..., ...}
    train: {epochs, batch_size, lr, ...}

Classification follows the MedMNIST v2 protocol by default (Adam, lr 1e-3 divided by 10 at epochs 50 and 75 of
100, batch 128, the checkpoint with the best validation AUC is tested). Segmentation trains on random patches (a
third of them centred on foreground, as nnU-Net samples) and flips, both by MONAI transforms, with Dice +
cross-entropy loss for a fixed number of steps; it predicts whole images with MONAI's sliding-window inference
(Gaussian weighting). Bags (MambaMIL, `format: bags`) train as classification does; a batch is `batch_size` bags,
each run through the model alone, as their sizes differ.

The run directory: config.yaml, model/ (safetensors), metrics.json (with the backend that ran), predictions and
report.md with pictures (`medstate.vision.report`)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from medstate.errors import MedstateError
from medstate.eval.metrics import auroc, bootstrap, wilson_interval
from medstate.train.loop import seed_everything
from medstate.vision.config import DataConfig, RunConfig, TrainConfig, config_dict
from medstate.vision.data import (
    ImageSet,
    as_channels,
    read_array,
    read_bag,
    read_bags,
    read_folder,
    read_medmnist,
    zscore,
)
from medstate.vision.mil import BagPredictions
from medstate.vision.models import (
    ModelSpec,
    backend_of,
    build_model,
    count_parameters,
    load_model,
    require_kernels,
    save_model,
)
from medstate.vision.segmentation_run import (
    Progress,
    fit_segmenter,
    milestone_schedule,
    predict_mask,
    segmentation_metrics,
)


def load_data(config: DataConfig, task: str) -> dict[str, ImageSet]:
    if config.format == "bags":
        return read_bags(config.path)
    splits = read_medmnist(config.path) if config.format == "medmnist" else read_folder(config.path, task)
    for split in splits.values():
        if config.normalize == "zscore":
            split.images = [zscore(image) for image in split.images]
        if config.foreground_only and split.masks is not None:
            split.instances = split.masks
            split.masks = [(m > 0).astype(np.int64) for m in split.masks]
    return splits


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stack(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images))


def _bag_forward(model: torch.nn.Module, data: ImageSet, i: int, device: torch.device):
    """MambaMIL on bag i, with its coordinates when known: (logits [1, K], attention [1, instances])."""
    coords = None if data.coords is None or data.coords[i] is None else torch.from_numpy(data.coords[i])[None]
    return model(torch.from_numpy(data.images[i])[None].to(device), None if coords is None else coords.to(device))


def class_logits(model: torch.nn.Module, data: ImageSet, indices, device: torch.device) -> torch.Tensor:
    """Logits [len(indices), K] of some items of a split: images as one batch; bags one at a time (they differ in
    size)."""
    if not data.bags:
        return model(_stack([data.images[i] for i in indices]).to(device))
    return torch.cat([_bag_forward(model, data, i, device)[0] for i in indices])


@torch.no_grad()
def predict_classes(model: torch.nn.Module, data: ImageSet, batch_size: int = 256) -> np.ndarray:
    """Class probabilities [N, K]."""
    model.eval()
    device = next(model.parameters()).device
    out = [
        torch.softmax(class_logits(model, data, range(i, min(i + batch_size, len(data))), device).float(), 1).cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out).numpy()


@torch.no_grad()
def predict_bags(model: torch.nn.Module, data: ImageSet) -> BagPredictions:
    model.eval()
    device = next(model.parameters()).device
    probabilities, attention = [], []
    for i in range(len(data)):
        logits, weights = _bag_forward(model, data, i, device)
        probabilities.append(torch.softmax(logits.float(), dim=1).cpu())
        attention.append(weights[0].float().cpu().numpy())
    return BagPredictions(torch.cat(probabilities).numpy(), attention)


def classification_metrics(labels: np.ndarray, probabilities: np.ndarray, n_bootstrap: int, seed: int = 0) -> dict:
    """AUC (binary: of the positive class; multiclass: one-vs-rest mean) with a bootstrap interval over images,
    accuracy of the most probable class (binary: probability ≥ 0.5, as MedMNIST) with a Wilson interval."""
    k = probabilities.shape[1]
    if k == 2:
        scores = probabilities[:, 1]
        metric = auroc
    else:
        scores = probabilities

        def metric(y, s):
            values = [auroc((y == c).astype(int), s[:, c]) for c in range(k)]
            return None if any(v is None for v in values) else float(np.mean(values))

    auc = bootstrap(metric, labels, scores, np.arange(len(labels)), n_bootstrap, seed)
    correct = int((probabilities.argmax(1) == labels).sum())
    low, high = wilson_interval(correct, len(labels))
    return {
        "n": len(labels),
        "auc": {"value": auc.value, "low": auc.low, "high": auc.high},
        "accuracy": {"value": correct / len(labels), "low": low, "high": high},
    }


def _fit_classifier(model, spec, splits, train: TrainConfig, device, progress: Progress | None):
    data = splits["train"]
    labels = torch.from_numpy(data.labels)
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    steps_per_epoch = -(-len(labels) // train.batch_size)
    total = train.epochs * steps_per_epoch
    scheduler = milestone_schedule(optimizer, train.epochs, train.milestones)
    generator = torch.Generator().manual_seed(train.seed)
    selection = splits.get("val")
    best, best_state, history, step = -1.0, None, [], 0
    for epoch in range(train.epochs):
        model.train()
        order = torch.randperm(len(labels), generator=generator)
        losses = []
        for i in range(0, len(labels), train.batch_size):
            batch = order[i : i + train.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(class_logits(model, data, batch.tolist(), device), labels[batch].to(device))
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            step += 1
            if progress:
                progress(step, total, loss.item())
        scheduler.step()
        entry = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if selection is not None:
            probabilities = predict_classes(model, selection)
            entry["val_loss"] = float(
                F.nll_loss(
                    torch.log(torch.from_numpy(probabilities).clamp_min(1e-12)), torch.from_numpy(selection.labels)
                )
            )
            score = classification_metrics(selection.labels, probabilities, 0)["auc"]["value"] or 0.0
            entry["val_auc"] = score
            if score > best:
                best, best_state = score, {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(entry)
    if best_state is not None:
        model.load_state_dict(best_state)
    selected = max(history, key=lambda e: e.get("val_auc", -1))["epoch"] if selection is not None else train.epochs
    return history, {"selected_epoch": selected, "steps": step}


# ----- segmentation ---------------------------------------------------------------------------------


def evaluate_model(model, spec: ModelSpec, data: ImageSet, train: TrainConfig) -> tuple[dict, Any]:
    """(metrics, predictions) of a model on one split: class probabilities [N, K] or label masks."""
    if spec.task == "bags":
        bags = predict_bags(model, data)
        return classification_metrics(data.labels, bags.probabilities, train.bootstrap, train.seed), bags
    if spec.task == "classification":
        probabilities = predict_classes(model, data)
        return classification_metrics(data.labels, probabilities, train.bootstrap, train.seed), probabilities
    masks = [
        predict_mask(model, image, tuple(train.patch_size), train.sw_overlap).argmax(0).astype(np.int64)
        for image in data.images
    ]
    return segmentation_metrics(data, masks, spec.config.num_classes), masks


def inference_settings(config: RunConfig) -> dict:
    return {
        "normalize": config.data.normalize,
        "patch_size": list(config.train.patch_size),
        "sw_overlap": config.train.sw_overlap,
    }


def evaluate_saved(model_dir: str | Path, config: RunConfig, split: str, out_dir: str | Path) -> dict:
    """A saved model on one split of the config's data: metrics.json, predictions and report in `out_dir`."""
    from medstate.vision.report import write_predictions, write_report

    model, spec, _ = load_model(model_dir)
    splits = load_data(config.data, spec.task)
    if split not in splits:
        raise MedstateError(f"the dataset has no {split} split (it has {', '.join(splits)})")
    device = _device()
    model.to(device)
    started = time.perf_counter()
    result, predictions = evaluate_model(model, spec, splits[split], config.train)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {
        "task": spec.task,
        "model": spec.kind,
        "split": split,
        "parameters": count_parameters(model),
        "backend": backend_of(model, device),
        "device": str(device),
        "train_seconds": 0.0,
        "seconds_per_step": 0.0,
        "evaluate_seconds": time.perf_counter() - started,
        "test": result,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_predictions(out_dir, spec, splits[split], predictions)
    write_report(out_dir, spec, metrics, splits[split], predictions)
    return metrics


def _read_inputs(files: list[Path], task: str, inference: dict) -> ImageSet:
    """Files given to `predict`: images or volumes, normalised as in training; or bags with their coordinates."""
    names = [Path(path).name for path in files]
    if task == "bags":
        bags, coords = zip(*(read_bag(Path(path)) for path in files)) if files else ((), ())
        return ImageSet(names, list(bags), bags=True, coords=list(coords))
    images, spacing = [], []
    for path in files:
        array, zooms = read_array(Path(path))
        image = as_channels(array, Path(path))
        images.append(zscore(image) if inference.get("normalize") == "zscore" else image)
        spacing.append(zooms or (1.0,) * (image.ndim - 1))
    return ImageSet(names, images, spacing=spacing)


def predict_files(model_dir: str | Path, files: list[Path], out_dir: str | Path) -> Path:
    """New images (or bags) → predictions.csv (classification) or one mask per image (segmentation) in `out_dir`."""
    from medstate.vision.report import write_predictions

    model, spec, inference = load_model(model_dir)
    model.to(_device())
    data = _read_inputs(files, spec.task, inference)
    if spec.task == "segmentation":
        patch = tuple(inference.get("patch_size") or data.images[0].shape[1:])
        overlap = float(inference.get("sw_overlap", 0.5))
        predictions = [predict_mask(model, image, patch, overlap).argmax(0) for image in data.images]
    else:
        predictions = predict_bags(model, data) if data.bags else predict_classes(model, data)
        data.labels = np.full(len(data), -1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_predictions(out_dir, spec, data, predictions)


def fit(
    config: RunConfig,
    run_dir: str | Path,
    progress: Progress | None = None,
    require_fused: bool = False,
) -> dict:
    """Train, test the selected model and write the run directory. Returns metrics.json's content."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    spec = config.model
    splits = load_data(config.data, spec.task)
    seed_everything(config.train.seed)
    device = _device()
    model = build_model(spec).to(device)
    if require_fused:
        require_kernels(model, device)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
    started = time.perf_counter()
    fitter = fit_segmenter if spec.task == "segmentation" else _fit_classifier
    history, selection = fitter(model, spec, splits, config.train, device, progress)
    seconds = time.perf_counter() - started
    save_model(model, spec, run_dir / "model", inference_settings(config))
    test, predictions = evaluate_model(model, spec, splits["test"], config.train)
    metrics = {
        "task": spec.task,
        "model": spec.kind,
        "parameters": count_parameters(model),
        "backend": backend_of(model, device),
        "device": str(device),
        "train_seconds": seconds,
        "seconds_per_step": seconds / max(1, selection["steps"]),
        **selection,
        "train_size": len(splits["train"]),
        "test": test,
        "history": history,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    from medstate.vision.report import write_predictions, write_report

    write_predictions(run_dir, spec, splits["test"], predictions)
    write_report(run_dir, spec, metrics, splits["test"], predictions)
    return metrics
