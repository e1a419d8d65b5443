"""ClinicalMamba's workloads, each case in its own worker process:

1. 13 criteria on one 4,096-token document: medstate's state branching (the document read once, each question from a
   copy of the state) vs re-encoding document + question for each criterion (ClinicalMamba's appended prompts are
   one long sequence: no cheaper), same model, same scores;
2. the same 13 scores with Hugging Face transformers' Mamba2ForCausalLM on the same weights, one forward per prompt
   (as evaluation harnesses score), vs medstate's branching: documents per second;
3. training steps (forward, backward, AdamW) of causal language modelling on a 16,384-token document for a
   mamba2-130m-shaped model (gradient checkpointing per block): seconds of the second step (the first allocates) and
   peak RSS over both, beside a GPT-2-small-sized Transformer (torch SDPA, same width and about the same
   parameters) at 4,096 and 16,384 tokens; both as medstate's Trainer runs on the CPU (`train.memory`).

    python benchmarks/notes.py            # ~20 min on 2 cores
    python benchmarks/notes.py --quick    # small sizes: checks the script only

Writes benchmarks/results/notes.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from backbone import GPT2SizedTransformer
from harness import answer_worker, case_runner, median, peak_rss_gb, ratio, timed, trainer_steps, write_report
from text import NEOX, gemm_peak

RESULTS = Path(__file__).resolve().parent / "results"
QUESTIONS = [
    "Does the patient use drugs?", "Has the patient abused alcohol?", "Has the patient had abdominal surgery?",
    "Does the patient take aspirin to prevent myocardial infarction?", "Has the patient had a myocardial infarction?",
    "Does the patient speak English?", "Can the patient make their own medical decisions?",
    "Has the patient had advanced cardiovascular disease?", "Has the patient had a major diabetes complication?",
    "Has the patient had HbA1c between 6.5 and 9.5?", "Has the patient had serum creatinine above normal?",
    "Does the patient have diabetes with ketoacidosis?", "Has the patient taken a dietary supplement?",
]  # fmt: skip


def _tokenizer():
    from medstate.text.tokenizer import TextTokenizer

    return TextTokenizer.load(
        NEOX if NEOX.is_dir() else Path(__file__).resolve().parents[1] / "data/demo/text/tokenizer"
    )


def _document(tokenizer, tokens: int) -> str:
    """Real clinical-note text (the shipped ACI-Bench notes), repeated to `tokens` tokens."""
    import csv
    import gzip

    path = Path(__file__).resolve().parents[1] / "data/demo/text/aci-bench/train.csv.gz"
    with gzip.open(path, "rt") as handle:
        notes = [row["note"] for row in csv.DictReader(handle)]
    text, i = "", 0
    while len(tokenizer.encode(text)) < tokens:
        text += notes[i % len(notes)] + "\n\n"
        i += 1
    return tokenizer.decode(tokenizer.encode(text)[:tokens])


def _checkpoint(sizes: dict, vocab: int, directory: Path) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.Mamba2Config(
        vocab_size=vocab, hidden_size=sizes["d_model"], num_hidden_layers=sizes["n_layer"], state_size=sizes["d_state"],
        head_dim=sizes["head_dim"], expand=2, n_groups=1, num_heads=2 * sizes["d_model"] // sizes["head_dim"],
        chunk_size=sizes["chunk_size"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Mamba2ForCausalLM(config).save_pretrained(directory)


# ----- workers ------------------------------------------------------------------------------------------


def scoring(spec: dict) -> dict:
    """13 criterion scores on one document: branched or re-encoded (medstate), or one HF forward per prompt."""
    from medstate.text.notes.classify import (
        QUESTION_TEMPLATE,
        Criterion,
        answer_ids,
        branched_slot_logits,
        reencoded_slot_logits,
    )

    torch.set_flush_denormal(True)
    tokenizer = _tokenizer()
    document = _document(tokenizer, spec["document_tokens"])
    criteria = [Criterion(f"c{i}", q) for i, q in enumerate(QUESTIONS)]
    if spec["impl"] == "hf":
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.Mamba2ForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
        prompts = [
            [tokenizer.eos_id, *tokenizer.encode(document + QUESTION_TEMPLATE.format(question=q))] for q in QUESTIONS
        ]

        def logits():
            return torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts])
    else:
        from medstate.ssm import load_pretrained

        model = load_pretrained(spec["checkpoint"]).eval()
        score = branched_slot_logits if spec["impl"] == "branched" else reencoded_slot_logits

        def logits():
            return score(model, tokenizer, document, criteria)

    kept = []

    def run():
        with torch.no_grad():
            kept.append(logits()[:, list(answer_ids(tokenizer))].double())

    times = timed(run, spec["repeats"], warmup=1 if spec["impl"] == "branched" else 0)
    return {"times": times, "yes_no_logits": kept[-1].tolist()}


def train_step(spec: dict) -> dict:
    """One causal-LM training step (forward, backward, AdamW) on one `tokens`-token row: seconds and peak RSS."""
    torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50000, (1, spec["tokens"]), generator=generator)
    if spec["impl"] == "medstate":
        from medstate.ssm import MambaLM, SSMConfig

        torch.manual_seed(0)
        model = MambaLM(SSMConfig(version=2, vocab_size=50288, **spec["sizes"]))
        model.backbone.gradient_checkpointing = True

        def loss_of():
            return model(ids, labels=ids, return_logits=False).loss
    else:
        model = GPT2SizedTransformer()
        head = torch.nn.Linear(768, 50257, bias=False)
        head.weight = model.embed.weight

        def loss_of():
            from medstate.ssm.loss import fused_linear_cross_entropy

            targets = torch.nn.functional.pad(ids[0, 1:], (0, 1), value=-100)
            return fused_linear_cross_entropy(model(ids)[0], head.weight, targets)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    # both models as medstate's Trainer runs on the CPU; the first step allocates, the second is the steady state
    times = trainer_steps(model.parameters(), loss_of, optimizer, spec.get("steps", 2), spec.get("retain", True))
    return {"times": times[1:] or times, "first_step": times[0], "peak_rss_gb": peak_rss_gb(),
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


WORKERS = {"scoring": scoring, "train_step": train_step}


# ----- driver -------------------------------------------------------------------------------------------


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

    small = dict(d_model=128, n_layer=2, d_state=32, head_dim=32, chunk_size=64) if quick else dict(
        d_model=256, n_layer=4, d_state=64, head_dim=32, chunk_size=128)  # fmt: skip
    mamba_130m = dict(d_model=768, n_layer=24, d_state=128, head_dim=64, chunk_size=256)
    document_tokens = 512 if quick else 4096
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = Path(directory) / "small"
        _checkpoint(small, 50288, checkpoint)
        spec = {"case": "scoring", "checkpoint": str(checkpoint), "document_tokens": document_tokens, "repeats": 3}
        branched = case("branched", {**spec, "impl": "branched"})
        reencoded = case("re-encoded", {**spec, "impl": "reencoded", "repeats": 1 if not quick else 2})
        hf = case("hf", {**spec, "impl": "hf", "repeats": 1 if not quick else 2})

    def largest_difference(a: dict, b: dict) -> float | None:
        if "yes_no_logits" not in a or "yes_no_logits" not in b:
            return None
        return float((torch.tensor(a["yes_no_logits"]) - torch.tensor(b["yes_no_logits"])).abs().max())

    agree, same = largest_difference(branched, hf), largest_difference(branched, reencoded)
    width = f"d {small['d_model']} × {small['n_layer']} layers"
    rows.append((f"13 criteria on a {document_tokens:,}-token document (s), {width}: branching vs re-encoding each "
                 "prompt", median(branched), median(reencoded), ratio(median(reencoded), median(branched)), "≥ 5",
                 "ratio = re-encoding / branching" + (f"; largest yes/no logit difference {same:.1e}"
                                                       if same is not None else "")))  # fmt: skip
    rows.append(("the same 13 scores (s): medstate branching vs HF Mamba2ForCausalLM, one forward per prompt",
                 median(branched), median(hf), ratio(median(hf), median(branched)), "≥ 2",
                 "ratio = HF / medstate"
                 + (f"; largest yes/no logit difference {agree:.1e}" if agree is not None else "")))  # fmt: skip

    sizes, shape = (small, width) if quick else (mamba_130m, "mamba2-130m shape")
    lengths = (512, 2048) if quick else (4096, 16384)
    for tokens in lengths:
        ours = case(f"mamba train step {tokens}", {"case": "train_step", "impl": "medstate", "sizes": sizes,
                                                   "tokens": tokens})  # fmt: skip
        theirs = case(f"transformer train step {tokens}", {"case": "train_step", "impl": "transformer",
                                                           "tokens": tokens})  # fmt: skip
        mine = "failed" if "error" in ours else (f"medstate peak RSS {ours['peak_rss_gb']:.1f} GB, first step "
                                                 f"{ours['first_step']:.1f} s")  # fmt: skip
        other = theirs.get("error") or (f"Transformer peak RSS {theirs['peak_rss_gb']:.1f} GB, first step "
                                        f"{theirs['first_step']:.1f} s")  # fmt: skip
        rows.append((f"training step on one {tokens:,}-token document (s, second step): {shape} (gradient "
                     "checkpointing per block) vs a GPT-2-small-sized Transformer (SDPA)", median(ours), median(theirs),
                     ratio(median(theirs), median(ours)), "report", f"{mine}; {other}"))  # fmt: skip
    # the same step with freed memory returned to the system (`train: {retain_memory: false}`): bounded memory
    bounded = case(f"mamba train step {lengths[-1]} (freed memory not kept)", {"case": "train_step", "impl": "medstate",
                   "sizes": sizes, "tokens": lengths[-1], "retain": False})  # fmt: skip
    rows.append((f"peak RSS of that {shape} training step at {lengths[-1]:,} tokens (GB), freed memory kept / not "
                 "kept", ours.get("peak_rss_gb"), bounded.get("peak_rss_gb"), ratio(bounded.get("peak_rss_gb"), 8.0),
                 "≤ 8 GB", f"ratio = not kept / 8 GB; not kept: second step {median(bounded) or float('nan'):.1f} s, "
                 f"first {bounded.get('first_step', float('nan')):.1f} s"))  # fmt: skip
    write_report("notes", rows, results, RESULTS)


if __name__ == "__main__":
    main()
