"""`medstate vision` end to end on tiny datasets written here: the run directory's numbers recomputed from its own
predictions with scikit-learn / the Dice definition, predict = the run's predictions, one-line errors, readers,
preparers and the nnU-Net constructor."""

import csv
import json
import pydoc
from pathlib import Path

import nibabel
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from medstate.cli import app
from medstate.vision.data import read_folder, read_medmnist

ROOT = Path(__file__).resolve().parents[2]
SHARED = ROOT.parent / "shared" / "data" / "imaging"
runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _classification_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8), ("test", 12)):
        (root / split / "images").mkdir(parents=True)
        rows = []
        for i in range(count):
            label = i % 2
            image = rng.integers(0, 80, (12, 12)).astype(np.uint8)
            if label:
                image[3:9, 3:9] += 120  # a bright square marks class 1
            Image.fromarray(image).save(root / split / "images" / f"im{i}.png")
            rows.append((f"im{i}.png", label))
        with (root / split / "labels.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([("image", "label"), *rows])


CLASSIFIER = """
data: {{format: folder, path: {path}}}
model: {{kind: vision-mamba, num_classes: 2, image_size: [12, 12], patch_size: 2, dim: 16, depth: 1}}
train: {{epochs: 3, batch_size: 8, lr: 0.003, bootstrap: 50}}
"""


def _train(tmp_path: Path, config_text: str):
    """`vision train` on a config written here → (run directory, metrics.json, predictions.csv rows)."""
    config = tmp_path / "run.yaml"
    config.write_text(config_text)
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    rows = list(csv.DictReader((run / "predictions.csv").open()))
    return run, json.loads((run / "metrics.json").read_text()), rows


def test_classification_run_is_consistent_with_its_predictions(tmp_path):
    _classification_folder(tmp_path / "data")
    run, metrics, rows = _train(tmp_path, CLASSIFIER.format(path=tmp_path / "data"))
    assert metrics["backend"] == "torch" and metrics["device"] == "cpu"
    assert len(metrics["history"]) == 3 and 1 <= metrics["selected_epoch"] <= 3
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["p1"]) for r in rows])
    assert metrics["test"]["n"] == 12
    assert metrics["test"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert metrics["test"]["accuracy"]["value"] == pytest.approx(np.mean((scores >= 0.5) == labels))
    low, high = metrics["test"]["auc"]["low"], metrics["test"]["auc"]["high"]
    assert low <= metrics["test"]["auc"]["value"] <= high
    assert (run / "report.md").is_file() and (run / "roc.png").is_file()
    # the saved model, fed the same files by `predict`, gives the run's test probabilities
    files = sorted((tmp_path / "data" / "test" / "images").iterdir())
    result = _invoke("vision", "predict", run / "model", *files, "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    predicted = {r["image"]: float(r["p1"]) for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())}
    assert all(predicted[r["image"]] == pytest.approx(float(r["p1"]), abs=1e-5) for r in rows)


def _segmentation_folder(root: Path, dims: int) -> None:
    rng = np.random.default_rng(1)
    size = (24, 20) if dims == 2 else (12, 10, 8)
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir(parents=True)
        for i in range(2):
            mask = np.zeros(size, dtype=np.uint8)
            corner = [int(rng.integers(0, s // 2)) for s in size]
            mask[tuple(slice(c, c + s // 3) for c, s in zip(corner, size))] = 1
            image = (rng.normal(0, 0.3, size) + mask).astype(np.float32)
            if dims == 2:
                tifffile.imwrite(root / split / "images" / f"c{i}.tif", image)
                tifffile.imwrite(root / split / "masks" / f"c{i}.tif", mask)
            else:
                affine = np.diag([2.0, 1.0, 3.0, 1.0])
                nibabel.save(nibabel.Nifti1Image(image, affine), root / split / "images" / f"c{i}.nii.gz")
                nibabel.save(nibabel.Nifti1Image(mask, affine), root / split / "masks" / f"c{i}.nii.gz")


SEGMENTER = """
data: {{format: folder, path: {path}, normalize: zscore}}
model:
  kind: umamba
  num_classes: 2
  spatial_dims: {dims}
  features_per_stage: [4, 8]
  strides: [1, 2]
  kernel_sizes: [3, 3]
  mamba_stages: [1]
  mixer: {{head_dim: 8, scan: {scan}}}
train: {{steps: 3, batch_size: 2, lr: 0.003, patch_size: {patch}}}
"""


@pytest.mark.parametrize("dims", [2, 3])
def test_segmentation_run_writes_masks_its_metrics_describe(tmp_path, dims):
    _segmentation_folder(tmp_path / "data", dims)
    config = tmp_path / "run.yaml"
    patch = [16, 16] if dims == 2 else [8, 8, 8]
    config.write_text(
        SEGMENTER.format(path=tmp_path / "data", dims=dims, scan="tri" if dims == 3 else "cross", patch=patch)
    )
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 0, result.output
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    suffix = ".tif" if dims == 2 else ".nii.gz"
    dices = []
    for i in range(2):
        if dims == 2:
            predicted = tifffile.imread(run / "predictions" / f"c{i}{suffix}")
            truth = tifffile.imread(tmp_path / "data" / "test" / "masks" / f"c{i}{suffix}")
        else:
            image = nibabel.load(run / "predictions" / f"c{i}{suffix}")
            assert tuple(image.header.get_zooms()) == (2.0, 1.0, 3.0)  # the input's spacing kept
            predicted = np.asarray(image.dataobj)
            truth = np.asarray(nibabel.load(tmp_path / "data" / "test" / "masks" / f"c{i}{suffix}").dataobj)
        assert predicted.shape == truth.shape
        p, t = predicted == 1, truth == 1
        dices.append(2 * (p & t).sum() / (p.sum() + t.sum()))
        assert metrics["test"]["images"][i]["dice_1"] == pytest.approx(dices[-1])
    assert metrics["test"]["summary"]["dice_1"] == pytest.approx(np.mean(dices))
    assert (run / "overlay-0.png").is_file()


def test_user_mistakes_are_one_line(tmp_path):
    _classification_folder(tmp_path / "data")
    (tmp_path / "data" / "test" / "labels.csv").write_text("image,label\nim0.png,1\n")
    config = tmp_path / "run.yaml"
    config.write_text(CLASSIFIER.format(path=tmp_path / "data"))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "has no label for im1.png" in result.output
    config.write_text(CLASSIFIER.format(path=tmp_path / "data").replace("vision-mamba", "vit"))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "kind must be one of" in result.output
    config.write_text(CLASSIFIER.format(path=tmp_path / "data").replace("depth: 1", "depth: 1, width: 3"))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "unknown key(s) width" in result.output
    config.write_text(CLASSIFIER.format(path=tmp_path / "data"))
    (tmp_path / "data" / "test" / "labels.csv").write_text(
        "image,label\n" + "".join(f"im{i}.png,0\n" for i in range(12))
    )
    result = _invoke("vision", "train", config, tmp_path / "run", "--require-kernels")
    assert result.exit_code == 2 and "fused kernels are not in use" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_classification_images_of_another_size_name_the_file(tmp_path):
    _classification_folder(tmp_path / "data")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "data" / "val" / "images" / "im3.png")
    with pytest.raises(Exception, match=r"im3.png: shape \(1, 10, 12\) differs from im0.png"):
        read_folder(tmp_path / "data", "classification")


def test_mask_shape_mismatch_names_the_file(tmp_path):
    _segmentation_folder(tmp_path / "data", 2)
    tifffile.imwrite(tmp_path / "data" / "test" / "masks" / "c1.tif", np.zeros((5, 5), np.uint8))
    with pytest.raises(Exception, match=r"c1.tif: mask shape \(5, 5\) differs"):
        read_folder(tmp_path / "data", "segmentation")


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/data/imaging")
def test_medmnist_splits_and_preparers(tmp_path):
    breast = read_medmnist(SHARED / "medmnist" / "breastmnist.npz")
    assert {k: len(v) for k, v in breast.items()} == {"train": 546, "val": 78, "test": 156}
    assert breast["train"].images[0].shape == (1, 28, 28) and breast["train"].images[0].max() <= 1.0
    # brain: labels 1-3 are the k-means classes 4-6 inside the skull-strip mask; the halves are the two hemispheres
    result = _invoke("vision", "prepare", "brain", SHARED / "itk-kmeans-brain", tmp_path / "brain")
    assert result.exit_code == 0, result.output
    strip = np.asarray(nibabel.load(SHARED / "itk-kmeans-brain" / "KmeansTest_T1RawSkullStrip.nii.gz").dataobj)
    kmeans = nibabel.load(SHARED / "itk-kmeans-brain" / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz").dataobj
    kmeans = np.asarray(kmeans)
    brain = read_folder(tmp_path / "brain", "segmentation")
    joined = np.concatenate([brain["train"].masks[0], brain["test"].masks[0]], axis=0)
    expected = np.select(
        [(strip > 0) & (kmeans == 4), (strip > 0) & (kmeans == 5), (strip > 0) & (kmeans == 6)], [1, 2, 3], 0
    )
    assert np.array_equal(joined, expected)
    assert min(np.bincount(joined.ravel())[1:]) > 20000  # three real tissue classes, none a handful of voxels
    assert brain["train"].spacing[0] == (2.0, 2.0, 3.0)
    result = _invoke("vision", "prepare", "nuclei", SHARED / "stardist-nuclei", tmp_path / "nuclei")
    assert result.exit_code == 0, result.output
    nuclei = read_folder(tmp_path / "nuclei", "segmentation")
    whole = tifffile.imread(SHARED / "stardist-nuclei" / "mask2d.tif")
    assert np.array_equal(np.concatenate([nuclei["train"].masks[0], nuclei["test"].masks[0]], axis=1), whole)


def test_nnunet_builds_the_net_from_a_plan():
    # what nnU-Net v2's get_network_from_plans does with a 3d_fullres plan (values as its planner writes them)
    arch_kwargs = {
        "n_stages": 4,
        "features_per_stage": [8, 16, 32, 64],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
        "strides": [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [2, 2, 2, 2],
        "n_conv_per_stage_decoder": [2, 2, 2],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
        "mamba_stages": [2, 3],
    }
    for name in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if arch_kwargs[name] is not None:
            arch_kwargs[name] = pydoc.locate(arch_kwargs[name])
    network_class = pydoc.locate("medstate.vision.nnunet.UMambaNnUNet")
    network = network_class(input_channels=1, num_classes=3, deep_supervision=True, **arch_kwargs)
    outputs = network(torch.randn(1, 1, 8, 16, 16))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 8, 16, 16), (1, 3, 8, 8, 8), (1, 3, 4, 4, 4)]
    network.decoder.deep_supervision = False  # nnU-Net's trainer, for validation and export
    assert network(torch.randn(1, 1, 8, 16, 16)).shape == (1, 3, 8, 16, 16)
    assert network.encoder[0].convs[0].kernel_size == (1, 3, 3)
    assert any(m is not None for m in (network.encoder[2].mamba, network.encoder[3].mamba))


def _bag_folder(root: Path, with_coords=("train", "test")) -> None:
    """Bags of 6-feature instances on a 5×5 grid; a positive bag holds two or three instances with feature 0 raised
    by 4 (the "tumour" patches), a negative bag none: learnable only by looking at single instances."""
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("val", 10), ("test", 16)):
        (root / split / "bags").mkdir(parents=True)
        if split in with_coords:
            (root / split / "coords").mkdir()
        rows = []
        for i in range(count):
            label = i % 2
            n = int(rng.integers(6, 17))
            bag = rng.normal(size=(n, 6)).astype(np.float32)
            if label:
                bag[rng.choice(n, size=int(rng.integers(2, 4)), replace=False), 0] += 4.0
            cells = rng.choice(25, size=n, replace=False)
            name = f"slide{i}.npy" if i % 3 else f"slide{i}.pt"
            if name.endswith(".pt"):
                torch.save(torch.from_numpy(bag), root / split / "bags" / name)
            else:
                np.save(root / split / "bags" / name, bag)
            if split in with_coords:
                grid = np.stack([cells // 5, cells % 5], 1)
                if name.endswith(".pt"):  # coordinates: a file of the bag's own name
                    torch.save(torch.from_numpy(grid), root / split / "coords" / name)
                else:
                    np.save(root / split / "coords" / name, grid)
            rows.append((name, label))
        with (root / split / "labels.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([("bag", "label"), *rows])


MIL = """
data: {{format: bags, path: {path}}}
model: {{kind: mil, num_classes: 2, in_features: 6, dim: 16, depth: 1, attention_dim: 16,
        mixer: {{scan: strided, stride: 2, head_dim: 8}}}}
train: {{epochs: 12, batch_size: 4, lr: 0.003, bootstrap: 50}}
"""


def test_bag_classification_run_learns_and_is_consistent_with_its_predictions(tmp_path):
    _bag_folder(tmp_path / "data")
    run, metrics, rows = _train(tmp_path, MIL.format(path=tmp_path / "data"))
    assert metrics["task"] == "bags" and metrics["backend"] == "torch" and metrics["test"]["n"] == 16
    labels = np.array([int(r["label"]) for r in rows])
    scores = np.array([float(r["p1"]) for r in rows])
    assert metrics["test"]["auc"]["value"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert roc_auc_score(labels, scores) >= 0.9  # found the raised instances
    # predict on the bag files reads each bag's coordinates: the run's probabilities, and the same for a bag whose
    # instances are listed in another order (MambaMIL sorts them by coordinates)
    test_dir = tmp_path / "data" / "test"
    files = sorted((test_dir / "bags").iterdir())
    shuffled = tmp_path / "shuffled"
    for sub in ("bags", "coords"):
        (shuffled / sub).mkdir(parents=True)
    bag, coords = np.load(test_dir / "bags" / "slide1.npy"), np.load(test_dir / "coords" / "slide1.npy")
    order = np.random.default_rng(1).permutation(len(bag))
    np.save(shuffled / "bags" / "slide1.npy", bag[order])
    np.save(shuffled / "coords" / "slide1.npy", coords[order])
    result = _invoke("vision", "predict", run / "model", *files, "--out", tmp_path / "pred")
    assert result.exit_code == 0, result.output
    predicted = {r["bag"]: float(r["p1"]) for r in csv.DictReader((tmp_path / "pred" / "predictions.csv").open())}
    assert all(predicted[r["bag"]] == pytest.approx(float(r["p1"]), abs=1e-5) for r in rows)
    result = _invoke("vision", "predict", run / "model", shuffled / "bags" / "slide1.npy", "--out", tmp_path / "p2")
    assert result.exit_code == 0, result.output
    again = next(csv.DictReader((tmp_path / "p2" / "predictions.csv").open()))
    assert float(again["p1"]) == pytest.approx(predicted["slide1.npy"], abs=1e-5)
    # attention: one weight per instance in the listed order, summing to 1, beside the instance's coordinates; the
    # shuffled bag's weights are the same instances' weights
    table = list(csv.DictReader((tmp_path / "pred" / "attention" / "slide1.csv").open()))
    weights = np.array([float(r["attention"]) for r in table])
    assert len(table) == len(bag) and weights.sum() == pytest.approx(1, abs=1e-4)
    assert [[int(r["coord0"]), int(r["coord1"])] for r in table] == coords.tolist()
    moved = [float(r["attention"]) for r in csv.DictReader((tmp_path / "p2" / "attention" / "slide1.csv").open())]
    assert np.allclose(moved, weights[order], atol=1e-5)
    assert (run / "attention" / "slide4.csv").is_file() and (run / "attention" / "slide3.csv").is_file()


def test_bag_mistakes_are_one_line(tmp_path):
    _bag_folder(tmp_path / "data")
    config = tmp_path / "run.yaml"
    config.write_text(MIL.format(path=tmp_path / "data").replace("format: bags", "format: folder"))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "data.format bags goes with model kind mil" in result.output
    config.write_text(MIL.format(path=tmp_path / "data").replace("format: bags", "format: bags, normalize: zscore"))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "bags are read as stored" in result.output
    config.write_text(MIL.format(path=tmp_path / "data"))
    (tmp_path / "data" / "val" / "coords").mkdir()
    np.save(tmp_path / "data" / "val" / "coords" / "slide2.npy", np.zeros((3, 2), np.int64))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "val/coords/slide2.npy: expected integer coordinates" in result.output
    np.save(tmp_path / "data" / "val" / "coords" / "slide2.npy", np.zeros((1, 2), np.int64))
    np.save(tmp_path / "data" / "val" / "bags" / "slide2.npy", np.zeros((1, 5), np.float32))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "val/bags/slide2.npy: 5 features per instance, other bags have 6" in result.output
    _bag_folder(tmp_path / "other")
    (tmp_path / "other" / "test" / "coords" / "slide2.npy").unlink()  # coordinates for some bags only
    config.write_text(MIL.format(path=tmp_path / "other"))
    result = _invoke("vision", "train", config, tmp_path / "run")
    assert result.exit_code == 2 and "test/coords has no coordinates for slide2.npy (1 bags)" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("config", sorted((ROOT / "data" / "demo" / "vision").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load_and_build(config):
    from medstate.vision.config import load_run_config
    from medstate.vision.models import build_model

    settings = load_run_config(config)
    model = build_model(settings.model)
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("dims", [2, 3])
def test_patch_sampler_crops_and_flips_image_and_mask_together(dims):
    from medstate.vision.segmentation_run import patch_sampler

    size, shape = ((8, 6), (20, 5)) if dims == 2 else ((6, 4, 4), (12, 3, 9))  # one axis shorter: padded
    mask = np.zeros(shape, np.int64)
    mask[(slice(-3, None),) + (slice(0, 2),) * (dims - 1)] = 1  # a small foreground block in a corner
    code = np.arange(1, mask.size + 1, dtype=np.float32).reshape(shape)  # every voxel's own number, 0 = padding
    image = np.stack([mask.astype(np.float32), code])
    flipped = [0] * dims
    with_foreground = []
    for fraction in (1.0, 0.0):
        sample = patch_sampler(size, fraction, seed=0)
        for _ in range(40):
            patch, patch_mask = sample(image, mask)
            assert patch.shape == (2, *size) and patch_mask.shape == size
            assert np.array_equal(patch[0], patch_mask)  # same crop, same flips
            real = patch[1] > 0
            # the voxels' own numbers: every label in the patch is the label at that voxel of the input
            assert np.array_equal(mask.reshape(-1)[patch[1][real].astype(int) - 1], patch_mask[real])
            for axis in range(dims):  # numbers fall along an axis where the patch was flipped
                n = size[axis]
                both = real.take(range(1, n), axis) & real.take(range(n - 1), axis)
                steps = np.diff(patch[1], axis=axis)[both]
                flipped[axis] += bool(steps.size) and steps.max() < 0
            with_foreground.append((fraction, bool(patch_mask.any())))
    assert all(has for fraction, has in with_foreground if fraction == 1.0)
    assert sum(has for fraction, has in with_foreground if fraction == 0.0) < 20
    assert all(count > 0 for count in flipped)
