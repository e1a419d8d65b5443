"""LoRA + layer pruning against full finetuning, and against Hugging Face transformers + PEFT, each case in its own
worker process (its peak RSS its own):

1. training steps (forward, backward, AdamW) of causal language modelling on one row of real clinical text (the
   shipped ACI-Bench dialogues and notes) for a mamba2-130m-shaped Mamba-2, as medstate's Trainer runs them on the
   CPU (`train.memory`): full finetuning; LoRA r=16, alpha 32 on in_proj and out_proj of every block; the same LoRA
   on the model with 33% of its blocks pruned (every third block dropped: 16 of 24 kept). Seconds of the steps after
   the first (median) and peak RSS; trainable share;
2. a LoRA step with HF transformers' Mamba2ForCausalLM + PEFT on the same weights, adapters on in_proj on both
   sides (PEFT refuses out_proj on HF's Mamba models);
3. with --quality: on ACI-Bench (the shipped train set → test set 1) and MedQuAD (20 held-out questions, beam
   search), from the text demo's model (`make text-demo`: no pretrained checkpoint can be downloaded here), full
   SFT vs LoRA SFT of the model pruned by block influence (1 of its 4 blocks), same data, steps and generation,
   LoRA's learning rate (1e-3 or 1e-2) chosen by the validation loss; ROUGE with intervals and the paired
   difference.

    python benchmarks/peft.py                        # the speed rows, ~15 min on 2 cores → results/peft.md
    python benchmarks/peft.py --quality --no-speed   # the quality rows, ~25 min → results/peft-quality.md
    python benchmarks/peft.py --quick                # small sizes: checks the script only

Writes benchmarks/results/peft.{json,md} (with --no-speed: peft-quality.{json,md}). (`harness`, imported first,
moves this folder behind the installed packages, so `import peft` below is Hugging Face's.)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from harness import answer_worker, case_runner, median, peak_rss_gb, ratio, trainer_steps, write_report
from notes import _checkpoint, _document, _tokenizer
from text import gemm_peak

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGETS = ["in_proj", "out_proj"]


def train_steps(spec: dict) -> dict:
    """Steps of causal-LM training on one `tokens`-token row of clinical text: seconds, peak RSS, trainable share."""
    torch.set_flush_denormal(True)
    tokenizer = _tokenizer()
    ids = torch.tensor([tokenizer.encode(_document(tokenizer, spec["tokens"]))])
    if spec["impl"] == "hf":
        import peft
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.Mamba2ForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32)
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                           target_modules=spec["targets"]))  # fmt: skip

        def loss_of():
            return model(input_ids=ids, labels=ids).loss
    else:
        from medstate.ssm import load_pretrained
        from medstate.ssm.lora import LoraSettings, add_lora
        from medstate.ssm.prune import keep_indices, prune_layers

        model = load_pretrained(spec["checkpoint"]).train()
        if spec.get("keep"):
            model = prune_layers(model, keep_indices(spec["keep"], model.config.n_layer)).train()
        if spec["impl"] == "lora":
            add_lora(model, LoraSettings(spec.get("targets", TARGETS), rank=16, alpha=32, dropout=0.0))

        def loss_of():
            return model(ids, labels=ids, return_logits=False).loss

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=True)
    times = trainer_steps(model.parameters(), loss_of, optimizer, spec["steps"])  # as medstate's Trainer on the CPU
    return {"times": times[1:], "first_step": times[0], "peak_rss_gb": peak_rss_gb(),
            "trainable": sum(p.numel() for p in trainable),
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


SFT_CONFIGS = {
    "aci-bench": ROOT / "data/demo/text/sft-notes.yaml",
    "medquad": ROOT / "docs/results/peft/sft-medquad.yaml",
}


def quality(spec: dict) -> dict:
    """Full SFT vs prune-then-LoRA SFT of the demo model on ACI-Bench notes and MedQuAD answers; paired ROUGE."""
    import dataclasses

    from medstate.ssm.lora import LoraSettings
    from medstate.text.biomed.sft import SFTConfig, finetune
    from medstate.text.corpora import read_corpus_list
    from medstate.text.rouge import paired_rouge_difference
    from medstate.text.summarise.pruning import prune_checkpoint

    work = Path(spec["work"])
    calibration = read_corpus_list(ROOT / "data/demo/text/heldout.yaml")[:1]
    report = prune_checkpoint(spec["init"], work / "pruned", drop=1, calibration=calibration, tokens=16384)
    runs, chosen, paired = {}, {}, {}
    for dataset, path in SFT_CONFIGS.items():
        config = SFTConfig.read(path)
        train = dataclasses.replace(config.train, **spec["train"])
        config = dataclasses.replace(config, init=spec["init"], train=train)
        lora = dataclasses.replace(config, init=str(work / "pruned"), lora=LoraSettings(rank=16, alpha=32))
        candidates = [("full", config)] + [
            (f"lora-pruned-lr{lr:g}", dataclasses.replace(lora, train=dataclasses.replace(train, lr=lr)))
            for lr in spec["lora_lrs"]
        ]
        found = runs[dataset] = {}
        for name, settings in candidates:
            started = time.perf_counter()
            metrics = finetune(settings, work / dataset / name).metrics
            found[name] = {"seconds": time.perf_counter() - started, "rouge": metrics["generation_rouge"],
                           "best_validation_loss": metrics["best_validation_loss"],
                           "lr": settings.train.lr}  # fmt: skip
        # LoRA's learning rate: the one with the lowest loss on the validation examples (never the test ROUGE)
        chosen[dataset] = min((n for n in found if n != "full"), key=lambda n: found[n]["best_validation_loss"])
        for task in found["full"]["rouge"]:
            rows = {name: [json.loads(line) for line in (work / dataset / name / f"generations-{task}.jsonl")
                           .read_text().splitlines()] for name in ("full", chosen[dataset])}  # fmt: skip
            paired[task] = {"dataset": dataset, **paired_rouge_difference(
                [r["output"] for r in rows[chosen[dataset]]], [r["output"] for r in rows["full"]],
                [r["reference"] for r in rows["full"]])}  # fmt: skip
    return {"runs": runs, "chosen": chosen, "paired": paired, "pruned": report}


WORKERS = {"train_steps": train_steps, "quality": quality}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--quality", action="store_true")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed and memory rows")
    args = parser.parse_args()
    if answer_worker(args.worker, WORKERS):
        return
    quick = args.quick
    script, results, rows = str(Path(__file__).resolve()), {"gemm_gflops": gemm_peak()}, []

    case = case_runner(script, results, 3600)

    if not args.no_speed:
        sizes = (dict(d_model=64, n_layer=6, d_state=16, head_dim=16, chunk_size=64) if quick else
                 dict(d_model=768, n_layer=24, d_state=128, head_dim=64, chunk_size=256))  # fmt: skip
        shape = "width 64 × 6 blocks" if quick else "mamba2-130m shape"
        tokens, steps = (256, 2) if quick else (2048, 5)
        keep = "drop:" + ",".join(str(i) for i in range(2, sizes["n_layer"], 3))  # every third block: 33% pruned
        with tempfile.TemporaryDirectory() as directory:
            checkpoint = Path(directory) / "model"
            _checkpoint(sizes, 50288, checkpoint)
            spec = {"case": "train_steps", "checkpoint": str(checkpoint), "tokens": tokens, "steps": steps}
            full = case("full finetuning", {**spec, "impl": "full"})
            lora = case("lora", {**spec, "impl": "lora"})
            pruned = case("lora + pruned", {**spec, "impl": "lora", "keep": keep})
            # PEFT refuses out_proj (and conv1d) on HF's Mamba models (its fused CUDA path would skip the adapter): the
            # comparison with HF adapts in_proj only, on both sides
            ours_in = case("lora on in_proj", {**spec, "impl": "lora", "targets": ["in_proj"]})
            hf = case("hf + peft lora on in_proj", {**spec, "impl": "hf", "targets": ["in_proj"]})
        share = pruned.get("trainable", 0) / full["parameters"] if "parameters" in full else None
        row = f"one {tokens:,}-token row of clinical text, {shape}"
        memory = pruned.get("peak_rss_gb"), full.get("peak_rss_gb")
        rows.append((f"peak RSS (GB), {row}: LoRA r=16 + 33% of blocks pruned vs full finetuning", *memory,
                     ratio(*memory), "≤ 0.55",
                     f"ratio = LoRA+pruned / full; LoRA alone {lora.get('peak_rss_gb', 0):.2f} GB"))  # fmt: skip
        rows.append((f"training step (s, median after the first), {row}: LoRA r=16 + 33% pruned vs full finetuning",
                     median(pruned), median(full), ratio(median(pruned), median(full)), "≤ 0.60",
                     f"ratio = LoRA+pruned / full; LoRA alone {median(lora) or float('nan'):.2f} s; trainable "
                     f"{pruned.get('trainable', 0):,} of the full model's {full.get('parameters', 0):,} parameters "
                     f"({100 * (share or 0):.2f}%)"))  # fmt: skip
        rows.append((f"LoRA training step (s), {row}: medstate vs HF Mamba2ForCausalLM + PEFT, same weights, LoRA r=16 "
                     "on in_proj (PEFT refuses out_proj on HF Mamba)", median(ours_in), median(hf),
                     ratio(median(hf), median(ours_in)), "≥ 2",
                     f"ratio = HF / medstate; peak RSS {ours_in.get('peak_rss_gb', float('nan')):.1f} GB vs HF "
                     f"{hf.get('peak_rss_gb', float('nan')):.1f} GB"))  # fmt: skip
    if args.quality:
        init = ROOT / "runs/text-demo/pretrain/model"
        with tempfile.TemporaryDirectory() as work:
            train = {"max_steps": 4} if quick else {}
            found = case("quality", {"case": "quality", "init": str(init), "work": work, "train": train,
                                     "lora_lrs": [1e-3, 1e-2]})  # fmt: skip
        for task, paired in found.get("paired", {}).items():
            dataset = paired["dataset"]
            runs = found["runs"][dataset]
            lora_run = runs[found["chosen"][dataset]]
            full_r1 = runs["full"]["rouge"][task]["rouge1"]["value"]
            lora_r1 = lora_run["rouge"][task]["rouge1"]["value"]
            difference = paired["rouge1"]
            rows.append((f"ROUGE-1, {task}: LoRA + 1 of 4 blocks pruned vs full SFT (demo model)", lora_r1, full_r1,
                         ratio(lora_r1, full_r1), "≥ 0.92",
                         f"LoRA LR {lora_run['lr']:g} (lowest validation loss of 1e-3, 1e-2); paired difference "
                         f"{difference['difference']:+.2f} [{difference['low']:+.2f}, "
                         f"{difference['high']:+.2f}]"))  # fmt: skip
    write_report("peft-quality" if args.no_speed else "peft", rows, results, RESULTS)


if __name__ == "__main__":
    main()
