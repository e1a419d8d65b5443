"""Long patient histories: one forward+backward of the EHR models' task loss on a single sequence of 2,048 to
16,384 tokens (subnormals flushed to zero, as in medstate's training loop), EhrMamba (Mamba-1 and Mamba-2 mixers)
vs the BigBird baseline (Hugging Face BigBird, block-sparse) and a full-attention BERT (torch SDPA) at the same
length and width. Every case runs in its own worker process:
seconds (median of repeats) and the worker's peak RSS.

    python benchmarks/ehr_long.py                   # all cases, 2,048 / 4,096 / 16,384 tokens
    python benchmarks/ehr_long.py --lengths 2048    # a smoke test
    python benchmarks/ehr_long.py --threads 1       # torch threads per worker (default: torch's default)

Writes benchmarks/results/ehr_long.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
from pathlib import Path

import numpy as np
import torch

from harness import median, peak_rss_gb, run_worker, timed

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 8192  # about the vocabulary of the 715-patient benchmark (7,453 tokens)
WIDTH = dict(d_model=128, n_layer=4)  # the EhrMamba defaults
MODELS = ("ehrmamba-m1", "ehrmamba-m2", "bigbird", "bert-full")


def build(model: str, tokens: int):
    from medstate.ehr.baselines.transformer import EhrTransformer, EhrTransformerConfig
    from medstate.ehr.model import EhrMamba, EhrMambaConfig

    if model.startswith("ehrmamba"):
        return EhrMamba(EhrMambaConfig(vocab_size=VOCAB, ssm_version=int(model[-1]), **WIDTH))
    architecture = "bigbird" if model == "bigbird" else "bert"
    config = EhrTransformerConfig(vocab_size=VOCAB, architecture=architecture, context=tokens, n_head=4, **WIDTH)
    return EhrTransformer(config)


def history(tokens: int) -> dict:
    """A synthetic history with the layout of a real one: visits of ~20 events, days and ages increasing."""
    rng = np.random.default_rng(0)
    visit = np.arange(tokens) // 20 + 1
    return {
        "input_ids": rng.integers(30, VOCAB, tokens),
        "token_types": np.full(tokens, 4),
        "ages": (50 + visit / 12).astype(np.float32),
        "times": (visit * 30.0).astype(np.float32),
        "visit_segments": (2 - visit % 2).astype(np.int64),
        "visit_orders": visit,
    }


def worker(spec: dict) -> dict:
    from medstate.ehr.batching import collate

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    torch.set_flush_denormal(True)  # as medstate's training loop does, for every model
    limit = int(spec["memory_limit_gb"] * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))  # a case that needs more fails with an allocation error
    torch.manual_seed(0)
    model = build(spec["model"], spec["tokens"]).train()
    batch = collate([history(spec["tokens"])])
    label = torch.ones(1)

    def step():
        model.zero_grad(set_to_none=True)
        logits = model(batch, ends=batch["ends"]).class_logits
        torch.nn.functional.binary_cross_entropy_with_logits(logits, label).backward()

    times = timed(step, spec["repeats"], warmup=1 if spec["repeats"] > 1 else 0)
    attention = getattr(getattr(model, "encoder", None), "attention_type", None)
    return {"times": times, "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads(), "attention": attention}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--lengths", default="2048,4096,16384")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--memory-limit-gb", type=float, default=16, help="address-space limit of each worker")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    rows = []
    for tokens in (int(n) for n in args.lengths.split(",")):
        for model in args.models.split(","):
            spec = {"model": model, "tokens": tokens, "repeats": 3 if tokens <= 4096 else 1, "threads": args.threads,
                    "memory_limit_gb": args.memory_limit_gb}  # fmt: skip
            result = run_worker(__file__, spec, args.timeout)
            rows.append({"model": model, "tokens": tokens, **result})
            shown = result.get("error") or f"{median(result):.2f} s, peak RSS {result['peak_rss_gb']:.2f} GB"
            print(f"{model:12s} {tokens:6d} tokens: {shown}", flush=True)
    report = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "memory_limit_gb": args.memory_limit_gb,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ehr_long.json").write_text(json.dumps(report, indent=2) + "\n")
    (RESULTS / "ehr_long.md").write_text(markdown(report))
    print(markdown(report))


def markdown(report: dict) -> str:
    rows = report["rows"]
    threads = sorted({r["threads"] for r in rows if "threads" in r})
    lines = [
        "# Long patient histories: forward+backward of the task loss, one sequence",
        "",
        f"torch {report['torch']}, {threads} thread(s) per worker; d_model {WIDTH['d_model']}, {WIDTH['n_layer']} "
        f"layers, vocabulary {VOCAB:,}; subnormals flushed to zero (as in medstate's training loop); each case in a "
        f"fresh process (peak RSS is the whole worker's) limited to {report['memory_limit_gb']:g} GB of address space.",
        "",
        "| tokens | model | seconds | peak RSS (GB) | seconds ÷ EhrMamba (Mamba-1) | RSS ÷ EhrMamba (Mamba-1) |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = next(r for r in rows if r["tokens"] == row["tokens"] and r["model"] == "ehrmamba-m1")
        if "error" in row:
            error = row["error"]
            if "allocate memory" in error:
                error = f"out of memory (over the {report['memory_limit_gb']:g} GB limit)"
            lines.append(f"| {row['tokens']:,} | {row['model']} | {error} | | | |")
            continue
        name = row["model"] + (f" ({row['attention']})" if row.get("attention") else "")
        ratio = (
            f"{median(row) / median(base):.2f} | {row['peak_rss_gb'] / base['peak_rss_gb']:.2f}"
            if "error" not in base
            else "- | -"
        )
        lines.append(f"| {row['tokens']:,} | {name} | {median(row):.2f} | {row['peak_rss_gb']:.2f} | {ratio} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
