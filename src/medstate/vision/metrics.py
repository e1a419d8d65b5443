"""Segmentation metrics on label arrays, from their definitions (tests compare them with MONAI's DiceMetric and
HausdorffDistanceMetric on the same masks).

- Dice of one class: 2 |P ∩ T| / (|P| + |T|); undefined (None) where the class is absent from the truth, as
  MONAI's `ignore_empty=True`.
- HD95: the symmetric 95th-percentile Hausdorff distance between the two masks' surfaces (a surface voxel is in the
  mask and not in its erosion), in the voxel spacing's units: max of the 95th percentiles of the distances from each
  surface to the other. Undefined where either mask is empty.
- Instance F1: predicted foreground split into connected components; a component matches a true instance when their
  IoU exceeds 0.5 (such matches are one-to-one); F1 = 2 TP / (2 TP + FP + FN).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def dice(predicted: np.ndarray, truth: np.ndarray, label: int = 1) -> float | None:
    p, t = predicted == label, truth == label
    if not t.any():
        return None
    return float(2 * np.logical_and(p, t).sum() / (p.sum() + t.sum()))


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def _directed_percentile(source: np.ndarray, target: np.ndarray, spacing, percentile: float) -> float:
    distance_to_target = ndimage.distance_transform_edt(~target, sampling=spacing)
    return float(np.percentile(distance_to_target[source], percentile))


def hausdorff95(
    predicted: np.ndarray, truth: np.ndarray, label: int = 1, spacing: tuple[float, ...] | None = None
) -> float | None:
    p, t = predicted == label, truth == label
    if not p.any() or not t.any():
        return None
    sp, st = _surface(p), _surface(t)
    spacing = spacing or (1.0,) * p.ndim
    return max(_directed_percentile(sp, st, spacing, 95), _directed_percentile(st, sp, spacing, 95))


def instance_f1(predicted_foreground: np.ndarray, instances: np.ndarray, iou_threshold: float = 0.5) -> dict:
    components, count = ndimage.label(predicted_foreground > 0)
    true_ids = [i for i in np.unique(instances) if i != 0]
    matched = 0
    for component in range(1, count + 1):
        region = components == component
        overlapping = np.unique(instances[region])
        for true_id in overlapping[overlapping != 0]:
            truth = instances == true_id
            iou = np.logical_and(region, truth).sum() / np.logical_or(region, truth).sum()
            if iou > iou_threshold:
                matched += 1
                break
    fp, fn = count - matched, len(true_ids) - matched
    denominator = 2 * matched + fp + fn
    return {
        "f1": float(2 * matched / denominator) if denominator else None,
        "matched": matched,
        "predicted": int(count),
        "true": len(true_ids),
    }
