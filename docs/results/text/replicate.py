"""BioMamba's claim, directionally, on the shipped demo text: a small Mamba-2 pretrained on general text (C4 +
Wikipedia), then continued on (a) biomedical text only, (b) the 80/10/10 biomedical/C4/Wikipedia mix, (c) the mix
with WSD, layer-wise LR decay and EMA; bits per byte on held-out abstracts and WikiText-2 test, per seed.

    python docs/results/text/replicate.py [--seeds 0,1,2] [--out runs/text-replicate]

Writes OUT/results.json and prints the table (mean and the seeds' values).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from medstate.text.biomed.pretrain import PretrainConfig, pretrain
from medstate.text.corpora import CorpusSource
from medstate.train.loop import TrainConfig

DEMO = Path(__file__).resolve().parents[3] / "data/demo/text"
GENERAL_STEPS, CONTINUED_STEPS = 200, 100


def sources(weights: dict[str, float]) -> list[CorpusSource]:
    base = PretrainConfig.read(DEMO / "pretrain.yaml")
    return [dataclasses.replace(s, weight=weights[s.name]) for s in base.corpora if weights.get(s.name)]


def run(out: Path, seed: int) -> dict:
    base = PretrainConfig.read(DEMO / "pretrain.yaml")
    base = dataclasses.replace(base, validation=[dataclasses.replace(v, limit=20) if v.name == "wikitext-2-test" else v
                                                 for v in base.validation])  # fmt: skip
    plain = dict(lr=3e-3, schedule="cosine", warmup_steps=10, betas=[0.9, 0.95], weight_decay=0.1, seed=seed,
                 save_every=1000, eval_every=0)  # fmt: skip
    general = pretrain(dataclasses.replace(base, corpora=sources({"c4": 0.5, "wikipedia": 0.5}),
                                           train=TrainConfig(max_steps=GENERAL_STEPS, **plain)),
                       out / f"seed{seed}/general")  # fmt: skip
    continued = {
        "a: biomedical only": (sources({"pubmed": 1.0}),
                               TrainConfig(max_steps=CONTINUED_STEPS, **{**plain, "lr": 1e-3})),
        "b: 80/10/10 mix": (sources({"pubmed": 0.8, "c4": 0.1, "wikipedia": 0.1}),
                            TrainConfig(max_steps=CONTINUED_STEPS, **{**plain, "lr": 1e-3})),
        "c: mix + WSD + LLRD + EMA": (
            sources({"pubmed": 0.8, "c4": 0.1, "wikipedia": 0.1}),
            TrainConfig(max_steps=CONTINUED_STEPS, **{**plain, "lr": 1e-3, "schedule": "wsd", "min_lr_ratio": 0.1,
                                                       "wsd_fractions": [0.1, 0.65, 0.25], "layer_decay": 0.9,
                                                       "ema_decay": 0.95}),
        ),
    }  # fmt: skip
    figures = {"general": general.metrics["validation"]}
    for name, (corpora, train) in continued.items():
        config = dataclasses.replace(base, corpora=corpora, init=str(general.model_dir), train=train)
        figures[name] = pretrain(config, out / f"seed{seed}" / name.split(":")[0]).metrics["validation"]
    return {k: {corpus: v[corpus]["bits_per_byte"]["value"] for corpus in v} for k, v in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default="runs/text-replicate")
    args = parser.parse_args()
    out = Path(args.out)
    results = {seed: run(out, seed) for seed in map(int, args.seeds.split(","))}
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    runs = next(iter(results.values()))
    corpora = list(next(iter(runs.values())))
    print("| model | " + " | ".join(f"bits/byte {c} (mean; seeds)" for c in corpora) + " |")
    print("|---" * (len(corpora) + 1) + "|")
    for name in runs:
        cells = []
        for corpus in corpora:
            values = [results[s][name][corpus] for s in results]
            cells.append(f"{np.mean(values):.4f} ({' / '.join(f'{v:.4f}' for v in values)})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
