"""The text recipes against BioMamba's layout and Hugging Face transformers, each case in its own worker process:

1. continued pretraining, packed rows (medstate) vs one document per padded row (BioMamba's layout): real
   (non-padding) tokens per second, same model, same corpora (the shipped demo mix), same rows of 1,024 tokens;
2. one continued-pretraining optimizer step (forward, backward, clip, AdamW, schedule) of medstate's loop vs
   Hugging Face `Mamba2ForCausalLM` + `transformers.Trainer`, identical weights and batch;
3. the cost of layer-wise LR decay + EMA on medstate's step;
4. scoring PubMedQA test items (three answers each): medstate (prompt read once, answers from copies of the
   state) vs transformers the way evaluation harnesses do it (one forward per prompt + answer);
5. DDP: tokens per second of 2 processes (torchrun, gloo) vs 1 on this machine.

    python benchmarks/text.py            # all cases (~15 min on 2 cores)
    python benchmarks/text.py --quick    # small sizes: checks the script only

Writes benchmarks/results/text.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from harness import answer_worker, case_runner, median, ratio, timed, write_report
from medstate.train.memory import retained_memory

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
DEMO = ROOT / "data/demo/text"
NEOX = ROOT.parent / "shared/data/tokenizers/gpt-neox-20b-tokenizer"


def gemm_peak() -> dict:
    """GFLOP/s of a 1024 × 512 × 1024 matrix product in fp32 and bf16, measured once per run, in the driver (bf16
    is 100x slower than fp32 on CPUs without bf16 instructions)."""
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(1024, 512, dtype=dtype), torch.randn(512, 1024, dtype=dtype)
        seconds = statistics.median(timed(lambda a=a, b=b: a @ b, 3))
        out[str(dtype).removeprefix("torch.")] = 2 * 1024 * 512 * 1024 / seconds / 1e9
    return out


def _corpora(weights=(0.8, 0.1, 0.1)):
    from medstate.text.corpora import read_corpus_list

    sources = read_corpus_list(DEMO / "corpora.yaml")
    for source, weight in zip(sources, weights):
        source.weight = weight
    return sources


def _tokenizer():
    from medstate.text.tokenizer import TextTokenizer

    return TextTokenizer.load(NEOX if NEOX.is_dir() else DEMO / "tokenizer")


def _model(spec: dict, vocab: int):
    from medstate.ssm import MambaLM, SSMConfig

    torch.manual_seed(0)
    return MambaLM(SSMConfig(version=2, vocab_size=vocab, **spec["sizes"]))


def _trainer(model, batches, spec, **train):
    from medstate.text.runs import language_model_loss
    from medstate.train.loop import TrainConfig, Trainer

    config = TrainConfig(max_steps=10_000, lr=1e-4, warmup_steps=0, schedule="constant", **train)
    return Trainer(model, language_model_loss, batches, config, tempfile.mkdtemp())


# ----- workers ------------------------------------------------------------------------------------------


def layout(spec: dict) -> dict:
    """Training steps on rows of the demo mix in one layout: real tokens per second."""
    from medstate.text.biomed.pretrain import RowBatches
    from medstate.text.mixing import MixedStream
    from medstate.text.tokenizer import padded_vocab_size

    torch.set_flush_denormal(True)
    tokenizer = _tokenizer()
    stream = MixedStream(_corpora(), tokenizer, spec["seq_len"], seed=0, layout=spec["layout"])
    batches = RowBatches(stream, spec["batch_size"])
    trainer = _trainer(_model(spec, padded_vocab_size(len(tokenizer))), batches, spec)
    real, seconds = [], []
    with retained_memory():  # as Trainer.fit does on the CPU
        trainer._step("cpu")  # warm-up
        for _ in range(spec["steps"]):
            before = sum(c.tokens for c in stream.cursors)
            start = time.perf_counter()
            trainer._step("cpu")
            seconds.append(time.perf_counter() - start)
            real.append(sum(c.tokens for c in stream.cursors) - before)
    return {"times": seconds, "real_tokens_per_s": [r / s for r, s in zip(real, seconds)],
            "padding_share": 1 - sum(real) / (spec["steps"] * spec["seq_len"] * spec["batch_size"])}  # fmt: skip


def _checkpoint(spec: dict, directory: Path) -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    config = transformers.Mamba2Config(
        vocab_size=spec["vocab"], hidden_size=spec["sizes"]["d_model"], num_hidden_layers=spec["sizes"]["n_layer"],
        state_size=spec["sizes"]["d_state"], head_dim=spec["sizes"]["head_dim"], expand=2, n_groups=1,
        num_heads=2 * spec["sizes"]["d_model"] // spec["sizes"]["head_dim"], chunk_size=spec["sizes"]["chunk_size"],
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.Mamba2ForCausalLM(config).save_pretrained(directory)


def step(spec: dict) -> dict:
    """Optimizer steps on one fixed batch (rows of real text): medstate's loop or HF Trainer."""
    torch.set_flush_denormal(True)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec["vocab"], (spec["batch_size"], spec["seq_len"]), generator=generator)
    if spec["impl"] == "medstate":
        from medstate.ssm import load_pretrained

        model = load_pretrained(spec["checkpoint"]).train()
        batch = {"input_ids": ids, "labels": ids}

        class Same:
            def __next__(self):
                return batch

            def state_dict(self):
                return {}

            def load_state_dict(self, state):
                pass

        extra = {"layer_decay": 0.9, "ema_decay": 0.999} if spec.get("llrd_ema") else {}
        trainer = _trainer(model, Same(), spec, **extra)
        with retained_memory():  # as Trainer.fit does on the CPU
            times = timed(lambda: trainer._step("cpu"), spec["repeats"])
        return {"times": times}
    import transformers
    from torch.utils.data import Dataset

    transformers.logging.set_verbosity_error()
    model = transformers.Mamba2ForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32)

    class Rows(Dataset):
        def __len__(self):
            return 10_000

        def __getitem__(self, i):
            return {"input_ids": ids[i % len(ids)], "labels": ids[i % len(ids)]}

    times, started = [], []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            started.append(time.perf_counter())

        def on_step_end(self, *args, **kwargs):
            times.append(time.perf_counter() - started[-1])

    arguments = transformers.TrainingArguments(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=spec["batch_size"], max_steps=spec["repeats"] + 1,
        learning_rate=1e-4, max_grad_norm=1.0, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    with retained_memory(spec.get("retain_memory", False)):  # medstate's Trainer keeps freed memory on the CPU
        transformers.Trainer(model=model, args=arguments, train_dataset=Rows(), callbacks=[Clock()]).train()
    return {"times": times[1:]}  # the first step warms up


def gemm_floor(spec: dict) -> dict:
    """The matrix products of one training step at the model's shape, timed alone (forward, and the two
    gradient products of every projection and of the vocabulary head): a lower bound on any fp32 step here."""
    sizes, tokens = spec["sizes"], spec["batch_size"] * spec["seq_len"]
    d_model, d_inner = sizes["d_model"], 2 * sizes["d_model"]
    in_proj = 2 * d_inner + 2 * sizes["d_state"] + d_inner // sizes["head_dim"]
    counts = {(d_model, spec["vocab"]): 1, (d_model, in_proj): sizes["n_layer"], (d_inner, d_model): sizes["n_layer"]}
    total = []
    for _ in range(spec["repeats"]):
        seconds = 0.0
        for (k, n), count in counts.items():
            a, w, g = torch.randn(tokens, k), torch.randn(n, k), torch.randn(tokens, n)
            products = (lambda a=a, w=w: a @ w.T, lambda g=g, w=w: g @ w, lambda g=g, a=a: g.T @ a)
            seconds += count * sum(min(timed(f, 2)) for f in products)
        total.append(seconds)
    return {"times": total}


def pubmedqa(spec: dict) -> dict:
    from medstate.text.biomed.pubmedqa import LABELS, load_pubmedqa, prompt_of

    torch.set_flush_denormal(True)
    tokenizer = _tokenizer()
    _, test = load_pubmedqa(DEMO / "pubmedqa")
    prompts = [prompt_of(item) for item in test[: spec["items"]]]
    choices = [f" {label}" for label in LABELS]
    if spec["impl"] == "medstate":
        from medstate.ssm import load_pretrained
        from medstate.text.choices import choice_loglikelihoods

        model = load_pretrained(spec["checkpoint"])
        start = time.perf_counter()
        scores = choice_loglikelihoods(model, tokenizer, prompts, choices, batch_size=8, max_prompt_tokens=1024)
        return {"times": [time.perf_counter() - start], "scores": scores.tolist()}
    import transformers

    transformers.logging.set_verbosity_error()
    model = transformers.Mamba2ForCausalLM.from_pretrained(spec["checkpoint"], dtype=torch.float32).eval()
    start = time.perf_counter()
    scores = []
    with torch.no_grad():
        for prompt in prompts:
            context = [tokenizer.eos_id, *tokenizer.encode(prompt)][-1024:]
            row = []
            for choice in choices:
                answer = tokenizer.encode(choice)
                logits = model(torch.tensor([context + answer])).logits[0].double()
                log_probs = torch.log_softmax(logits[len(context) - 1 : -1], -1)
                row.append(float(log_probs[torch.arange(len(answer)), torch.tensor(answer)].sum()))
            scores.append(row)
    return {"times": [time.perf_counter() - start], "scores": scores}


def ddp(spec: dict) -> dict:
    """Text pretraining steps under torchrun with `processes` processes: global real tokens per second."""
    script = Path(__file__).resolve()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec['processes']}",
               str(script), "--ddp-worker", json.dumps(spec)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    if result.returncode != 0:
        return {"error": result.stderr.strip().splitlines()[-1]}
    return json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])


def ddp_worker(spec: dict) -> None:
    from medstate.text.biomed.pretrain import RowBatches
    from medstate.text.mixing import MixedStream
    from medstate.text.tokenizer import padded_vocab_size
    from medstate.train.distributed import all_reduce_sum

    torch.set_flush_denormal(True)
    tokenizer = _tokenizer()
    stream = MixedStream(_corpora(), tokenizer, spec["seq_len"], seed=0)
    trainer = _trainer(_model(spec, padded_vocab_size(len(tokenizer))), RowBatches(stream, spec["batch_size"]), spec)
    with retained_memory():  # as Trainer.fit does on the CPU
        trainer._step("cpu")
        start = time.perf_counter()
        tokens = sum(trainer._step("cpu")[1] for _ in range(spec["steps"]))  # scored tokens of all processes
        elapsed = all_reduce_sum([time.perf_counter() - start], torch.device("cpu"))[0] / trainer.world.size
    if trainer.world.main:
        print(json.dumps({"tokens_per_s": [tokens / elapsed], "processes": trainer.world.size}))


WORKERS = {"layout": layout, "step": step, "gemm_floor": gemm_floor, "pubmedqa": pubmedqa, "ddp": ddp}


# ----- driver -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker")
    parser.add_argument("--ddp-worker")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if answer_worker(args.worker, WORKERS):
        return
    if args.ddp_worker:
        ddp_worker(json.loads(args.ddp_worker))
        return
    quick = args.quick
    sizes = dict(d_model=128, n_layer=2, d_state=32, head_dim=32, chunk_size=64) if quick else dict(
        d_model=256, n_layer=4, d_state=64, head_dim=32, chunk_size=128)  # fmt: skip
    script, results, rows = str(Path(__file__).resolve()), {"gemm_gflops": gemm_peak()}, []

    case = case_runner(script, results, 1800)

    steps = 2 if quick else 6
    for name in ("packed", "padded"):
        case(f"layout {name}", {"case": "layout", "layout": name, "sizes": sizes, "seq_len": 1024, "batch_size": 4,
                                "steps": steps})  # fmt: skip
    rate = {n: statistics.median(results[f"layout {n}"]["real_tokens_per_s"]) for n in ("packed", "padded")}
    rows.append(("real tokens/s, packed vs BioMamba's padded rows (1,024 tokens)", rate["packed"], rate["padded"],
                 ratio(rate["packed"], rate["padded"]), "≥ 2.5",
                 f"padding {results['layout padded']['padding_share']:.0%} of padded rows"))  # fmt: skip

    # the step at the demo's width and at the shape of state-spaces/mamba2-130m (BioMamba's smallest model)
    shapes = {f"d {sizes['d_model']} × {sizes['n_layer']} layers, 2 × 512 tokens": (sizes, 2, 512)}
    if not quick:
        shapes["mamba2-130m shape (d 768 × 24 layers), 1 × 1,024 tokens"] = (
            dict(d_model=768, n_layer=24, d_state=128, head_dim=64, chunk_size=256), 1, 1024)  # fmt: skip
    vocab = 50288
    with tempfile.TemporaryDirectory() as directory:
        for index, (label, (shape, batch_size, seq_len)) in enumerate(shapes.items()):
            checkpoint = Path(directory) / f"shape{index}"
            step_spec = {"case": "step", "sizes": shape, "vocab": vocab, "seq_len": seq_len, "batch_size": batch_size,
                         "repeats": 3 if quick else 5, "checkpoint": str(checkpoint)}  # fmt: skip
            _checkpoint(step_spec, checkpoint)
            ours = median(case(f"step medstate {label}", {**step_spec, "impl": "medstate"}))
            theirs = median(case(f"step hf {label}", {**step_spec, "impl": "hf"}))
            kept = median(case(f"step hf, memory kept {label}", {**step_spec, "impl": "hf", "retain_memory": True}))
            floor = median(case(f"step gemm floor {label}", {**step_spec, "case": "gemm_floor"}))
            rows.append((f"continued-pretraining step (s), {label}: medstate vs HF Mamba2ForCausalLM + Trainer",
                         ours, theirs, ratio(theirs, ours), "≥ 2",
                         f"50,288 ids; ratio HF / medstate; the step's matrix products alone take {floor:.3f} s, "
                         f"so no implementation in fp32 here can beat {ratio(theirs, floor):.2f}×; HF with "
                         f"medstate's malloc setting (train.memory) {kept:.3f} s, "
                         f"ratio {ratio(kept, ours):.2f}×"))  # fmt: skip
            if index == 0:
                both = median(case("step medstate llrd+ema", {**step_spec, "impl": "medstate", "llrd_ema": True}))
                rows.append(("medstate step (s): with LLRD + EMA vs without", both, ours, ratio(both, ours),
                             "≤ 1.10", "ratio = with / without"))  # fmt: skip
        qa_spec = {"case": "pubmedqa", "items": 10 if quick else 100, "checkpoint": str(Path(directory) / "shape0")}
        ours_qa = case("pubmedqa medstate", {**qa_spec, "impl": "medstate"})
        theirs_qa = case("pubmedqa hf", {**qa_spec, "impl": "hf"})
        agree = max(abs(a - b) for x, y in zip(ours_qa["scores"], theirs_qa["scores"]) for a, b in zip(x, y))
        rows.append((f"PubMedQA scoring of {qa_spec['items']} test items × 3 answers (s)", median(ours_qa),
                     median(theirs_qa), ratio(median(theirs_qa), median(ours_qa)), "≥ 2",
                     f"ratio = HF / medstate; largest log-likelihood difference {agree:.1e}"))  # fmt: skip
    ddp_spec = {"sizes": sizes, "seq_len": 512, "batch_size": 2, "steps": 3 if quick else 8, "case": "ddp"}
    one = case("ddp 1 process", {**ddp_spec, "processes": 1, "threads": 2})
    two = case("ddp 2 processes", {**ddp_spec, "processes": 2, "threads": 1})
    rate_two, rate_one = median(two, "tokens_per_s"), median(one, "tokens_per_s")
    rows.append(("DDP tokens/s: 2 processes (1 thread each) vs 1 (2 threads)", rate_two, rate_one,
                 ratio(rate_two, rate_one), "report", "gloo on CPU"))  # fmt: skip
    write_report("text", rows, results, RESULTS)


if __name__ == "__main__":
    main()
