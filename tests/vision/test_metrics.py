"""Segmentation metrics against MONAI on hand-made masks, and against values worked out by hand."""

import numpy as np
import pytest
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric

from medstate.vision.metrics import dice, hausdorff95, instance_f1

# MONAI 1.5+ warns about its own deprecated argument inside HausdorffDistanceMetric
pytestmark = pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")


def _monai(metric, predicted, truth, label, **kwargs):
    p = torch.from_numpy(predicted == label)[None, None].float()
    t = torch.from_numpy(truth == label)[None, None].float()
    return float(metric(p, t, **kwargs))


def _masks_2d():
    truth = np.zeros((20, 24), dtype=np.int64)
    truth[3:12, 4:15] = 1
    truth[14:18, 2:6] = 2
    predicted = np.zeros_like(truth)
    predicted[5:13, 6:16] = 1
    predicted[15:19, 1:5] = 2
    predicted[0, 23] = 1  # a stray pixel far away: moves HD95 only if it is more than 5% of the surface
    return predicted, truth


def _masks_3d():
    rng = np.random.default_rng(0)
    truth = np.zeros((9, 12, 10), dtype=np.int64)
    truth[2:7, 3:9, 2:8] = 1
    predicted = truth.copy()
    predicted[rng.random(truth.shape) < 0.08] = 1  # speckle
    predicted[2:4, 3:5, 2:4] = 0
    return predicted, truth


@pytest.mark.parametrize("masks", [_masks_2d, _masks_3d], ids=["2d", "3d"])
def test_dice_and_hd95_equal_monai(masks):
    predicted, truth = masks()
    for label in [v for v in np.unique(truth) if v]:
        assert dice(predicted, truth, label) == pytest.approx(_monai(DiceMetric(), predicted, truth, label), abs=1e-6)
        spacing = (2.0, 1.0, 3.0)[: truth.ndim]
        monai_hd = HausdorffDistanceMetric(percentile=95)
        ours = hausdorff95(predicted, truth, label, spacing)
        assert ours == pytest.approx(_monai(monai_hd, predicted, truth, label, spacing=spacing), abs=1e-5)


def test_hand_worked_values():
    truth = np.zeros((10, 10), dtype=np.int64)
    truth[2:6, 2:6] = 1  # 16 pixels
    predicted = np.zeros_like(truth)
    predicted[2:6, 4:8] = 1  # shifted 2 columns: 8 shared
    assert dice(predicted, truth) == pytest.approx(2 * 8 / 32)
    # every surface pixel of one square lies within 2 pixels of the other's surface; the far columns at exactly 2
    assert hausdorff95(predicted, truth) == pytest.approx(2.0)
    assert dice(predicted, np.zeros_like(truth)) is None
    assert hausdorff95(np.zeros_like(truth), truth) is None


def test_instance_f1_counts_matches_by_iou():
    instances = np.zeros((12, 12), dtype=np.int64)
    instances[1:4, 1:4] = 1
    instances[6:10, 6:10] = 2
    instances[1:3, 8:11] = 3
    predicted = np.zeros_like(instances)
    predicted[1:4, 1:4] = 1  # exact match
    predicted[6:10, 6:8] = 1  # half of instance 2: IoU 0.5, not above it
    predicted[10:12, 0:2] = 1  # a false positive
    result = instance_f1(predicted, instances)
    assert result == {"f1": pytest.approx(2 * 1 / (2 + 2 + 2)), "matched": 1, "predicted": 3, "true": 3}
    # touching predictions merge into one component and match nothing
    merged = np.zeros_like(instances)
    merged[1:4, 1:5] = 1
    merged[1:3, 5:11] = 1
    assert instance_f1(merged, instances)["matched"] == 0
