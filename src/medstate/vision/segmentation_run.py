"""Segmentation training pieces of a vision run: MONAI patch sampling (foreground-centred with a set probability,
flips), Dice + cross-entropy, sliding-window prediction of whole images, Dice / HD95 / instance F1 per image; and
the learning-rate schedule with milestones that classification training shares."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch

from medstate.errors import MedstateError
from medstate.vision import imaging_module
from medstate.vision.config import TrainConfig
from medstate.vision.data import (
    ImageSet,
)
from medstate.vision.metrics import dice, hausdorff95, instance_f1

Progress = Callable[[int, int, float], None]


def milestone_schedule(optimizer, total: int, milestones: list[float]):
    points = sorted({max(1, round(f * total)) for f in milestones})
    return torch.optim.lr_scheduler.MultiStepLR(optimizer, points, gamma=0.1)


# ----- classification -------------------------------------------------------------------------------


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


def fit_segmenter(model, spec, splits, train: TrainConfig, device, progress: Progress | None):
    data = splits["train"]
    size = tuple(train.patch_size)
    if len(size) != data.images[0].ndim - 1:
        raise MedstateError(f"train.patch_size {list(size)} does not match the images' {data.images[0].ndim - 1} axes")
    rng = np.random.default_rng(train.seed)
    sample = patch_sampler(size, train.foreground_fraction, train.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay)
    scheduler = milestone_schedule(optimizer, train.steps, train.milestones)
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
