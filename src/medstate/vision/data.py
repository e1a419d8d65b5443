"""Images and volumes in, as arrays: MedMNIST `.npz` files and folders of image files with labels or masks.

A folder dataset has one sub-folder per split (`train`, `val`, `test`; `val` optional), each with `images/` and
either `masks/` (segmentation: a mask file of the same name per image, integer classes, 0 = background) or
`labels.csv` (classification: columns `image,label`). Files: PNG/JPEG (Pillow), TIFF (tifffile), NIfTI
(`.nii`, `.nii.gz`, nibabel; voxel spacing from the header) and NumPy `.npy`. Every problem names the file.

A bag dataset (multiple-instance learning: one bag of instance features per slide, from any frozen patch encoder)
has, per split, `bags/` with one `.npy` or `.pt` file per bag ([instances, features], float), optionally `coords/`
with a file of the same name holding each instance's integer grid position ([instances, 2 or 3]), and
`labels.csv` (columns `bag,label`).

`prepare_nuclei` and `prepare_brain` write the shared StarDist and ITK examples in this layout."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medstate.errors import MedstateError
from medstate.vision import imaging_module

SPLITS = ("train", "val", "test")
SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz", ".npy")
BAG_SUFFIXES = (".npy", ".pt")


@dataclass
class ImageSet:
    """One split: images [C, *S] float32 (sizes may differ), and labels or masks; or bags [instances, features]
    float32 (`bags` set) with their instances' coordinates where known."""

    names: list[str]
    images: list[np.ndarray]
    labels: np.ndarray | None = None  # [N] int64
    masks: list[np.ndarray] | None = None  # each [*S] int64
    instances: list[np.ndarray] | None = None  # instance ids before `foreground_only` merged them
    spacing: list[tuple[float, ...]] = field(default_factory=list)
    bags: bool = False
    coords: list[np.ndarray | None] | None = None  # bags: [instances, k] int64 each, or None

    def __len__(self) -> int:
        return len(self.names)


def _suffix(path: Path) -> str:
    return ".nii.gz" if path.name.lower().endswith(".nii.gz") else path.suffix.lower()


def read_array(path: Path) -> tuple[np.ndarray, tuple[float, ...] | None]:
    """A file's pixel array as stored and its spacing (NIfTI only)."""
    suffix = _suffix(path)
    try:
        if suffix in (".png", ".jpg", ".jpeg"):
            from PIL import Image

            with Image.open(path) as image:
                return np.asarray(image), None
        if suffix in (".tif", ".tiff"):
            return imaging_module("tifffile").imread(path), None
        if suffix in (".nii", ".nii.gz"):
            image = imaging_module("nibabel").load(path)
            return np.asarray(image.dataobj), tuple(float(z) for z in image.header.get_zooms()[:3])
        if suffix == ".npy":
            return np.load(path, allow_pickle=False), None
    except (OSError, ValueError) as err:
        raise MedstateError(f"cannot read image {path}: {err}") from None
    raise MedstateError(f"{path}: unsupported image file (use {', '.join(SUFFIXES)})")


def as_channels(array: np.ndarray, path: Path) -> np.ndarray:
    """Pixels → [C, *S] float32: a 2D or 3D single-channel array gains a channel axis; RGB(A) images ([H, W, 3|4])
    become 3 channels."""
    if array.ndim == 3 and array.shape[-1] in (3, 4) and _suffix(path) not in (".nii", ".nii.gz"):
        return np.moveaxis(array[..., :3], -1, 0).astype(np.float32)
    if array.ndim in (2, 3):
        return array[None].astype(np.float32)
    raise MedstateError(f"{path}: expected a 2D image or a 3D volume, got an array of shape {array.shape}")


def read_medmnist(path: str | Path) -> dict[str, ImageSet]:
    path = Path(path)
    try:
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise MedstateError(f"cannot read MedMNIST file {path}: {err}") from None
    out = {}
    for split in SPLITS:
        if f"{split}_images" not in arrays:
            raise MedstateError(f"{path}: no {split}_images (a MedMNIST file has train/val/test images and labels)")
        images = arrays[f"{split}_images"]
        labels = arrays[f"{split}_labels"].reshape(len(images), -1)
        if labels.shape[1] != 1:
            raise MedstateError(f"{path}: multi-label MedMNIST sets are not supported")
        channels = [as_channels(image, path) / 255.0 for image in images]
        names = [f"{split}-{i:05d}" for i in range(len(images))]
        out[split] = ImageSet(names, channels, labels=labels[:, 0].astype(np.int64))
    return out


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and _suffix(p) in SUFFIXES)


def _read_labels(path: Path, key: str = "image") -> dict[str, int]:
    labels = {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {key, "label"} <= set(reader.fieldnames):
            raise MedstateError(f"{path} needs the columns {key},label")
        for line, row in enumerate(reader, start=2):
            try:
                labels[row[key]] = int(row["label"])
            except (TypeError, ValueError):
                raise MedstateError(f"{path} line {line}: label {row['label']!r} is not an integer") from None
    return labels


def read_split(folder: Path, task: str) -> ImageSet:
    image_dir = folder / "images"
    if not image_dir.is_dir():
        raise MedstateError(f"{folder} has no images/ folder")
    files = _files(image_dir)
    if not files:
        raise MedstateError(f"{image_dir} holds no image files ({', '.join(SUFFIXES)})")
    names, images, spacing = [], [], []
    for path in files:
        array, zooms = read_array(path)
        names.append(path.name)
        images.append(as_channels(array, path))
        spacing.append(zooms or (1.0,) * (images[-1].ndim - 1))
    if task == "classification":
        odd = [n for n, image in zip(names, images) if image.shape != images[0].shape]
        if odd:
            raise MedstateError(
                f"{image_dir / odd[0]}: shape {images[names.index(odd[0])].shape} differs from {names[0]}'s "
                f"{images[0].shape}; a classifier needs images of one size"
            )
        labels_path = folder / "labels.csv"
        if not labels_path.is_file():
            raise MedstateError(f"{folder} has no labels.csv (columns image,label) for classification")
        labels = _read_labels(labels_path)
        unlabelled = [n for n in names if n not in labels]
        if unlabelled:
            raise MedstateError(f"{labels_path} has no label for {unlabelled[0]} ({len(unlabelled)} images unlabelled)")
        return ImageSet(names, images, labels=np.array([labels[n] for n in names], dtype=np.int64), spacing=spacing)
    masks = []
    for name, image in zip(names, images):
        mask_path = folder / "masks" / name
        if not mask_path.is_file():
            raise MedstateError(f"{folder / 'masks'} has no mask {name} for images/{name}")
        mask = read_array(mask_path)[0]
        if mask.shape != image.shape[1:]:
            raise MedstateError(f"{mask_path}: mask shape {mask.shape} differs from the image's {image.shape[1:]}")
        if not np.issubdtype(mask.dtype, np.integer):
            raise MedstateError(f"{mask_path}: a mask holds integer classes, got {mask.dtype}")
        masks.append(mask.astype(np.int64))
    return ImageSet(names, images, masks=masks, spacing=spacing)


def read_folder(root: str | Path, task: str) -> dict[str, ImageSet]:
    root = Path(root)
    if not root.is_dir():
        raise MedstateError(f"dataset folder {root} not found")
    splits = {split: read_split(root / split, task) for split in SPLITS if (root / split).is_dir()}
    for needed in ("train", "test"):
        if needed not in splits:
            raise MedstateError(f"{root} has no {needed}/ folder (splits: train, val (optional), test)")
    return splits


def _bag_array(path: Path, what: str) -> np.ndarray:
    try:
        if _suffix(path) == ".pt":
            import torch

            value = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"holds a {type(value).__name__}, not a tensor")
            return value.float().numpy() if value.is_floating_point() else value.numpy()
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, RuntimeError) as err:
        raise MedstateError(f"cannot read {what} {path}: {err}") from None


def read_bag(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """One bag file → (features [instances, features] float32, coordinates [instances, k] int64 or None). The
    coordinates are the file of the same name in `coords/` beside the bag's folder, when there is one."""
    path = Path(path)
    if _suffix(path) not in BAG_SUFFIXES:
        raise MedstateError(f"{path}: a bag is a .npy or .pt file of [instances, features]")
    bag = _bag_array(path, "bag")
    if bag.ndim != 2 or bag.shape[0] < 1 or not np.issubdtype(bag.dtype, np.number):
        raise MedstateError(f"{path}: a bag is [instances, features] numbers, got {bag.dtype} {bag.shape}")
    if not np.isfinite(bag).all():
        raise MedstateError(f"{path}: the bag holds NaN or infinite features")
    coords_path = path.parent.parent / "coords" / path.name
    coords = None
    if coords_path.is_file():
        coords = _bag_array(coords_path, "coordinates")
        if coords.ndim != 2 or coords.shape[0] != bag.shape[0] or not np.issubdtype(coords.dtype, np.integer):
            raise MedstateError(
                f"{coords_path}: expected integer coordinates [{bag.shape[0]}, 2 or 3] for the bag's "
                f"{bag.shape[0]} instances, got {coords.dtype} {coords.shape}"
            )
        coords = coords.astype(np.int64)
    return bag.astype(np.float32), coords


def read_bags(root: str | Path) -> dict[str, ImageSet]:
    root = Path(root)
    if not root.is_dir():
        raise MedstateError(f"dataset folder {root} not found")
    splits, width = {}, None
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            continue
        bag_dir = folder / "bags"
        files = sorted(p for p in bag_dir.iterdir() if _suffix(p) in BAG_SUFFIXES) if bag_dir.is_dir() else []
        if not files:
            raise MedstateError(f"{bag_dir} holds no bag files (.npy or .pt, [instances, features])")
        stems = [p.name.rsplit(".", 1)[0] for p in files]
        twins = sorted({stem for stem in stems if stems.count(stem) > 1})
        if twins:
            raise MedstateError(f"{bag_dir}: two bag files named {twins[0]} (.npy and .pt); keep one")
        bags, coords = zip(*(read_bag(path) for path in files))
        for path, bag in zip(files, bags):
            width = width or bag.shape[1]
            if bag.shape[1] != width:
                raise MedstateError(f"{path}: {bag.shape[1]} features per instance, other bags have {width}")
        missing = [p.name for p, c in zip(files, coords) if c is None]
        if (folder / "coords").is_dir() and missing:
            raise MedstateError(f"{folder / 'coords'} has no coordinates for {missing[0]} ({len(missing)} bags)")
        labels_path = folder / "labels.csv"
        if not labels_path.is_file():
            raise MedstateError(f"{folder} has no labels.csv (columns bag,label)")
        labels = _read_labels(labels_path, "bag")
        names = [p.name for p in files]
        unlabelled = [n for n in names if n not in labels]
        if unlabelled:
            raise MedstateError(f"{labels_path} has no label for {unlabelled[0]} ({len(unlabelled)} bags unlabelled)")
        splits[split] = ImageSet(
            names,
            list(bags),
            labels=np.array([labels[n] for n in names], dtype=np.int64),
            bags=True,
            coords=list(coords),
        )
    for needed in ("train", "test"):
        if needed not in splits:
            raise MedstateError(f"{root} has no {needed}/ folder (splits: train, val (optional), test)")
    return splits


def zscore(image: np.ndarray) -> np.ndarray:
    """Per image and channel: zero mean, unit variance (nnU-Net's normalisation for MRI and microscopy)."""
    axes = tuple(range(1, image.ndim))
    mean = image.mean(axis=axes, keepdims=True)
    std = image.std(axis=axes, keepdims=True)
    return ((image - mean) / np.maximum(std, 1e-8)).astype(np.float32)


def write_array(path: Path, array: np.ndarray, spacing: tuple[float, ...] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if _suffix(path) in (".nii", ".nii.gz"):
        nibabel = imaging_module("nibabel")
        affine = np.diag([*(spacing or (1.0, 1.0, 1.0)), 1.0])
        nibabel.save(nibabel.Nifti1Image(array, affine), path)
    else:
        imaging_module("tifffile").imwrite(path, array)


def prepare_nuclei(source: str | Path, out: str | Path) -> Path:
    """StarDist's 2D nuclei image (512²) → train = left half, test = right half; masks keep the instance ids
    (0 = background), so foreground Dice and instance F1 can both be scored."""
    source, out = Path(source), Path(out)
    image, mask = read_array(source / "img2d.tif")[0], read_array(source / "mask2d.tif")[0]
    half = image.shape[1] // 2
    for split, part in (("train", slice(0, half)), ("test", slice(half, None))):
        write_array(out / split / "images" / "nuclei.tif", np.ascontiguousarray(image[:, part]))
        write_array(out / split / "masks" / "nuclei.tif", np.ascontiguousarray(mask[:, part].astype(np.uint16)))
    return out


BRAIN_CLASSES = {0: "background", 1: "tissue 4 (k-means)", 2: "tissue 5 (k-means)", 3: "tissue 6 (k-means)"}


def prepare_brain(source: str | Path, out: str | Path) -> Path:
    """ITK's T1 volume (128×128×62, 2×2×3 mm) → tissue labels 1-3 inside the brain: the k-means segmentation's
    classes 4, 5, 6 (the only ones it gives inside the skull-strip mask; mean T1 48, 76, 101: CSF-like, grey and
    white matter), 0 elsewhere. A silver standard from k-means, not a manual segmentation. Train = the left
    hemisphere (first 64 voxels of the left-right axis), test = the right one."""
    nibabel = imaging_module("nibabel")
    source, out = Path(source), Path(out)
    t1 = nibabel.load(source / "KmeansTest_T1UCharRaw.nii.gz")
    brain = np.asarray(nibabel.load(source / "KmeansTest_T1RawSkullStrip.nii.gz").dataobj) > 0
    kmeans = np.asarray(nibabel.load(source / "KmeansTest_T1KmeansPrelimSegmentation.nii.gz").dataobj)
    labels = np.zeros(kmeans.shape, dtype=np.uint8)
    for label, value in ((1, 4), (2, 5), (3, 6)):
        labels[brain & (kmeans == value)] = label
    volume = np.asarray(t1.dataobj).astype(np.int16)
    spacing = tuple(float(z) for z in t1.header.get_zooms()[:3])
    half = volume.shape[0] // 2
    for split, part in (("train", slice(0, half)), ("test", slice(half, None))):
        write_array(out / split / "images" / "brain.nii.gz", np.ascontiguousarray(volume[part]), spacing)
        write_array(out / split / "masks" / "brain.nii.gz", np.ascontiguousarray(labels[part]), spacing)
    return out


# `medstate vision prepare DATASET`: name → (preparer, its folder under ../shared/data/imaging)
PREPARERS = {"nuclei": (prepare_nuclei, "stardist-nuclei"), "brain": (prepare_brain, "itk-kmeans-brain")}


def prepare_dataset(dataset: str, source: str | Path, out: str | Path) -> Path:
    """`medstate vision prepare`: a shared example (`PREPARERS`) written in the folder layout `vision train` reads."""
    if dataset not in PREPARERS:
        raise MedstateError(f"unknown dataset {dataset!r}; choose {' or '.join(PREPARERS)}")
    return PREPARERS[dataset][0](source, out)
