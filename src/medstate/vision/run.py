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

import dataclasses
import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from medstate.errors import MedstateError
from medstate.eval.metrics import auroc, bootstrap, wilson_interval
from medstate.loading import PATH, expect_mapping, from_data, settings_data
from medstate.train.loop import seed_everything
from medstate.vision import imaging_module
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
from medstate.vision.metrics import dice, hausdorff95, instance_f1
from medstate.vision.mil import BagPredictions
from medstate.vision.models import (
    ModelSpec,
    backend_of,
    build_model,
    count_parameters,
    load_model,
    model_spec,
    require_kernels,
    save_model,
)

Progress = Callable[[int, int, float], None]


@dataclass
class DataConfig:
    path: str = field(metadata=PATH)
    format: str = "folder"  # medmnist | folder | bags
    foreground_only: bool = False  # segmentation: every non-zero label is class 1 (instance masks)
    normalize: str = "unit"  # unit: as read (MedMNIST: /255); zscore: per image and channel

    def __post_init__(self) -> None:
        if self.format not in ("medmnist", "folder", "bags"):
            raise MedstateError(f"data.format must be medmnist, folder or bags, got {self.format!r}")
        if self.normalize not in ("unit", "zscore"):
            raise MedstateError(f"data.normalize must be unit or zscore, got {self.normalize!r}")


@dataclass
class TrainConfig:
    epochs: int = 100  # classification
    steps: int = 500  # segmentation (patches)
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.0
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of training; lr x 0.1 at each
    seed: int = 0
    patch_size: list[int] = field(default_factory=lambda: [64, 64])
    foreground_fraction: float = 0.33
    sw_overlap: float = 0.5
    bootstrap: int = 1000
    threads: int | None = None


@dataclass
class RunConfig:
    data: DataConfig
    model: Any
    train: TrainConfig = field(default_factory=TrainConfig)


def run_config(data: Any, where: str) -> RunConfig:
    data = dict(expect_mapping(data, where))
    if "model" not in data:
        raise MedstateError(f"{where}: missing key model")
    spec = model_spec(data.pop("model"), f"{where}: model")
    config = from_data(RunConfig, {**data, "model": {}}, where)
    config.model = spec
    if (spec.task == "bags") != (config.data.format == "bags"):
        raise MedstateError(f"{where}: data.format bags goes with model kind mil, and only with it")
    if spec.task == "bags" and config.data.normalize != "unit":
        raise MedstateError(f"{where}: data.normalize applies to images; bags are read as stored")
    return config


def load_run_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """A run YAML (its data path relative to its folder) with typed overrides (`load_settings`'s dotted keys:
    `{"train.seed": 1}`)."""
    return run_config(settings_data(RunConfig, path, overrides, "vision run config"), f"vision run config {path}")


def config_dict(config: RunConfig) -> dict:
    return {
        "data": dataclasses.asdict(config.data),
        "model": config.model.to_dict(),
        "train": dataclasses.asdict(config.train),
    }


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


def _schedule(optimizer, total: int, milestones: list[float]):
    points = sorted({max(1, round(f * total)) for f in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, points, gamma=0.1)


# ----- classification -------------------------------------------------------------------------------


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
    scheduler = _schedule(optimizer, train.epochs, train.milestones)
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


def patch_sampler(size: tuple[int, ...], foreground_fraction: float, seed: int):
    """MONAI transforms for a training patch: pad to the patch size, crop a patch centred on a foreground voxel
    with probability `foreground_fraction` (nnU-Net's oversampling; otherwise on a background voxel), flip each axis
    with probability 1/2. Returns sample(image [C, *S], mask [*S]) → (image patch, mask patch), the same crop and
    flips for both."""
    transforms = imaging_module("monai.transforms")
    keys = ["image", "mask"]
    compose = transforms.Compose(
        [
            transforms.SpatialPadd(keys, spatial_size=size),
            transforms.RandCropByPosNegLabeld(
                keys, "mask", size, pos=foreground_fraction, neg=1 - foreground_fraction, num_samples=1
            ),
            *(transforms.RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(len(size))),
        ]
    )
    compose.set_random_state(seed=seed)

    def sample(image: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with warnings.catch_warnings():  # an image without foreground: the crop is centred on background
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            patch = compose({"image": image, "mask": mask[None]})[0]
        return np.asarray(patch["image"]), np.asarray(patch["mask"][0])

    return sample


def _dice_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return imaging_module("monai.losses").DiceCELoss(to_onehot_y=True, softmax=True)(logits, target.unsqueeze(1))


def _first_output(output):
    return output[0] if isinstance(output, (list, tuple)) else output


@torch.no_grad()
def predict_mask(model: torch.nn.Module, image: np.ndarray, patch: tuple[int, ...], overlap: float) -> np.ndarray:
    """Class probabilities [K, *S] for a whole image, by sliding windows of the training patch size."""
    sliding_window_inference = imaging_module("monai.inferers").sliding_window_inference
    model.eval()
    device = next(model.parameters()).device
    tensor = torch.from_numpy(image)[None].to(device)
    probabilities = sliding_window_inference(
        tensor,
        patch,
        4,
        lambda x: torch.softmax(_first_output(model(x)).float(), dim=1),
        overlap=overlap,
        mode="gaussian",
    )
    return probabilities[0].cpu().numpy()


def segmentation_metrics(splits_set: ImageSet, predictions: list[np.ndarray], num_classes: int) -> dict:
    """Per class: Dice and HD95 per image and their mean; instance F1 where instance masks are known."""
    per_image = []
    for i, (name, truth, predicted) in enumerate(zip(splits_set.names, splits_set.masks, predictions)):
        spacing = splits_set.spacing[i] if splits_set.spacing else None
        entry = {"image": name}
        for label in range(1, num_classes):
            entry[f"dice_{label}"] = dice(predicted, truth, label)
            entry[f"hd95_{label}"] = hausdorff95(predicted, truth, label, spacing)
        if splits_set.instances is not None:
            entry["instance"] = instance_f1(predicted, splits_set.instances[i])
        per_image.append(entry)
    summary = {}
    for label in range(1, num_classes):
        for metric in ("dice", "hd95"):
            values = [e[f"{metric}_{label}"] for e in per_image if e[f"{metric}_{label}"] is not None]
            summary[f"{metric}_{label}"] = float(np.mean(values)) if values else None
    if num_classes > 2:
        dices = [summary[f"dice_{c}"] for c in range(1, num_classes) if summary[f"dice_{c}"] is not None]
        summary["dice_mean"] = float(np.mean(dices)) if dices else None
    if per_image and "instance" in per_image[0]:
        summary["instance_f1"] = float(np.mean([e["instance"]["f1"] or 0.0 for e in per_image]))
    return {"summary": summary, "images": per_image}


def _fit_segmenter(model, spec, splits, train: TrainConfig, device, progress: Progress | None):
    data = splits["train"]
    size = tuple(train.patch_size)
    if len(size) != data.images[0].ndim - 1:
        raise MedstateError(f"train.patch_size {list(size)} does not match the images' {data.images[0].ndim - 1} axes")
    rng = np.random.default_rng(train.seed)
    sample = patch_sampler(size, train.foreground_fraction, train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = _schedule(optimizer, train.steps, train.milestones)
    history, window = [], []
    model.train()
    for step in range(1, train.steps + 1):
        picks = rng.integers(0, len(data), train.batch_size)
        pairs = [sample(data.images[i], data.masks[i]) for i in picks]
        images = torch.from_numpy(np.stack([p[0] for p in pairs])).to(device)
        masks = torch.from_numpy(np.stack([p[1] for p in pairs])).to(device)
        optimizer.zero_grad(set_to_none=True)
        loss = _dice_ce(_first_output(model(images)), masks)
        loss.backward()
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if progress:
            progress(step, train.steps, loss.item())
        if step % 50 == 0 or step == train.steps:
            history.append({"step": step, "train_loss": float(np.mean(window))})
            window = []
    return history, {"steps": train.steps}


# ----- runs -----------------------------------------------------------------------------------------


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
    fitter = _fit_segmenter if spec.task == "segmentation" else _fit_classifier
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
