"""Imaging on the CPU, each case in its own worker process (its peak RSS its own), same run:

1. training step (forward, Dice + cross-entropy, backward, AdamW) of the U-Mamba-style segmenter vs the same net
   without Mamba stages (the same-size CNN U-Net) and MONAI's SwinUNETR (feature size 24), at 2D 256² (batch 4),
   3D 64³ and 128³ (batch 1): median seconds after a warm-up step, peak RSS;
2. training step (cross-entropy, Adam) of the tiny Vision Mamba classifier (`data/demo/vision/breastmnist-mamba.yaml`:
   patch 2 → 196 tokens, width 96, 4 blocks, bidirectional, Mamba-2), the same with its convolutional stem
   (`breastmnist-mamba-stem.yaml`) and with the engine's mixer rows all at once, vs ResNet-18 with the CIFAR stem,
   28×28, batch 128.

    python benchmarks/vision.py           # ~15 min on 2 cores → results/vision.md
    python benchmarks/vision.py --quick   # small sizes: checks the script only
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from harness import answer_worker, case_runner, median, peak_rss_gb, ratio, timed, write_report
from text import gemm_peak

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def _segmenter(kind: str, dims: int, classes: int, quick: bool):
    from medstate.vision.blocks import MixerSpec
    from medstate.vision.models import SwinUNETRConfig, _swin_unetr
    from medstate.vision.segmentation import SegmenterConfig, UMambaSegmenter

    if kind == "swinunetr":
        return _swin_unetr(SwinUNETRConfig(num_classes=classes, spatial_dims=dims, feature_size=12 if quick else 24))
    features = [8, 16, 32] if quick else [16, 32, 64, 128, 256]
    stages = len(features)
    config = SegmenterConfig(
        num_classes=classes,
        spatial_dims=dims,
        features_per_stage=features,
        strides=[1] + [2] * (stages - 1),
        kernel_sizes=[3] * stages,
        mamba_stages=[stages - 2, stages - 1] if kind == "umamba" else [],
        mixer=MixerSpec(scan="tri" if dims == 3 else "cross"),
    )
    return UMambaSegmenter(config)


def segmentation_step(spec: dict) -> dict:
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    dims, size, batch = spec["dims"], spec["size"], spec["batch"]
    model = _segmenter(spec["model"], dims, 3, spec["quick"]).train()
    images = torch.randn(batch, 1, *([size] * dims))
    masks = torch.randint(0, 3, (batch, 1, *([size] * dims)))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(images), masks).backward()
        optimizer.step()

    times = timed(step, spec["steps"])
    return {"times": times, "peak_rss_gb": peak_rss_gb(), "parameters": sum(p.numel() for p in model.parameters())}


def classifier_step(spec: dict) -> dict:
    from medstate.loading import read_yaml
    from medstate.vision.models import build_model, model_spec

    torch.manual_seed(0)
    if spec.get("whole_rows"):  # the engine before row pieces: every mixer op over all rows at once
        import medstate.ssm.modules as modules

        modules.cpu_piece_rows = lambda rows, steps, width: rows
    if spec["model"] == "resnet18":
        model_data = {"kind": "resnet18", "num_classes": 2}
    else:
        model_data = read_yaml(ROOT / f"data/demo/vision/{spec['model']}.yaml", "config")["model"]
        if spec["quick"]:
            model_data = {**model_data, "depth": 1}
    model = build_model(model_spec(model_data, "benchmark")).train()
    images, labels = torch.randn(spec["batch"], 1, 28, 28), torch.randint(0, 2, (spec["batch"],))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()

    times = timed(step, spec["steps"])
    return {"times": times, "peak_rss_gb": peak_rss_gb(), "parameters": sum(p.numel() for p in model.parameters())}


WORKERS = {"segmentation_step": segmentation_step, "classifier_step": classifier_step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if answer_worker(args.worker, WORKERS):
        return
    quick = args.quick
    script, results, rows = str(Path(__file__).resolve()), {"gemm_gflops": gemm_peak()}, []
    case = case_runner(script, results, 1800)

    sizes = [(2, 64, 2), (3, 32, 1)] if quick else [(2, 256, 4), (3, 64, 1), (3, 128, 1)]
    for dims, size, batch in sizes:
        label = f"{size}{'²' if dims == 2 else '³'}, batch {batch}"
        found = {}
        for model in ("umamba", "cnn", "swinunetr"):
            spec = {"case": "segmentation_step", "model": model, "dims": dims, "size": size, "batch": batch,
                    "steps": 2 if quick else 3, "quick": quick}  # fmt: skip
            found[model] = case(f"{model} {label}", spec)
        ours = found["umamba"]
        for peer, name in (("cnn", "same-size CNN U-Net"), ("swinunetr", "MONAI SwinUNETR")):
            theirs = found[peer]
            rows.append((f"segmentation training step (s), {label}: U-Mamba-style vs {name}", median(ours),
                         median(theirs), ratio(median(ours), median(theirs)), "-",
                         f"ratio = ours / theirs; parameters {ours.get('parameters', 0):,} vs "
                         f"{theirs.get('parameters', 0):,}"))  # fmt: skip
            target = "≤ 0.5" if (peer == "swinunetr" and size == 128) else "-"
            rows.append((f"segmentation peak RSS (GB), {label}: U-Mamba-style vs {name}", ours.get("peak_rss_gb"),
                         theirs.get("peak_rss_gb"), ratio(ours.get("peak_rss_gb"), theirs.get("peak_rss_gb")),
                         target, "ratio = ours / theirs"))  # fmt: skip

    batch = 16 if quick else 128
    spec = {"case": "classifier_step", "batch": batch, "steps": 2 if quick else 5, "quick": quick}
    mamba = case("vision mamba 28x28", {**spec, "model": "breastmnist-mamba"})
    stem = case("vision mamba + conv stem 28x28", {**spec, "model": "breastmnist-mamba-stem"})
    resnet = case("resnet18 28x28", {**spec, "model": "resnet18"})
    whole = case("vision mamba 28x28, rows not in pieces", {**spec, "model": "breastmnist-mamba", "whole_rows": True})
    rows.append((f"classifier training step (s), 28×28, batch {batch}: tiny Vision Mamba (196 tokens, width 96, "
                 "4 blocks, bidirectional, Mamba-2) vs ResNet-18 (CIFAR stem)", median(mamba), median(resnet),
                 ratio(median(mamba), median(resnet)), "≤ 1.5",
                 f"ratio = ours / ResNet-18; parameters {mamba.get('parameters', 0):,} vs "
                 f"{resnet.get('parameters', 0):,}; peak RSS {mamba.get('peak_rss_gb', 0):.2f} vs "
                 f"{resnet.get('peak_rss_gb', 0):.2f} GB"))  # fmt: skip
    rows.append((f"classifier training step (s), 28×28, batch {batch}: the same with a convolutional stem (two 3×3 "
                 "convolutions, 32 channels, at 28×28) vs ResNet-18 (CIFAR stem)", median(stem), median(resnet),
                 ratio(median(stem), median(resnet)), "-",
                 f"ratio = ours / ResNet-18; parameters {stem.get('parameters', 0):,}; peak RSS "
                 f"{stem.get('peak_rss_gb', 0):.2f} GB"))  # fmt: skip
    rows.append((f"classifier training step (s), 28×28, batch {batch}: mixer rows in cache-sized pieces vs all rows "
                 "at once (the engine before this change)", median(mamba), median(whole),
                 ratio(median(whole), median(mamba)), "-", "ratio = all at once / pieces"))  # fmt: skip
    write_report("vision", rows, results, RESULTS)


if __name__ == "__main__":
    main()
