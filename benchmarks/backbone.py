"""medstate's Mamba backbone vs Hugging Face transformers on identical weights, in one run.

Every measurement runs in a fresh worker process (so peak RSS is that case's alone); the parent prints a table
of medians and ratios and writes benchmarks/results/backbone.{json,md}.

    python benchmarks/backbone.py            # all cases (~20 min on a 2-core CPU)
    python benchmarks/backbone.py --quick    # small shapes, a smoke test of the script (~1 min)
    python benchmarks/backbone.py --only m1_train decode

Cases (targets from issue 2 in brackets):
  m1_train      Mamba-1, d_model 256, 4 layers, 512 tokens, forward+backward of the LM loss
                (vocabulary 4,096, an EHR-sized code vocabulary; also 50,280)            [>= 20x HF]
  m2_train      Mamba-2 at mamba2-130m shapes, 1,024 tokens, forward+backward           [>= 4x, peak RSS <= 1/3]
  m2_forward    the same model, forward at 4,096 tokens, fp32 and bf16 autocast; model-FLOP utilisation
                against the GEMM peak measured in the same run                          [>= 2x]
  decode        step() tokens/s after 512- and 16,384-token prefills; HF generate      [equal within 10%]
  long_context  final hidden states of one 65,536-token sequence (Mamba-2 130M, segmented prefill) and a
                GPT-2-small-sized Transformer with torch SDPA                           [peak RSS <= 4 GB]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from harness import median, peak_rss_gb, run_worker, timed

RESULTS = Path(__file__).resolve().parent / "results"

M2_130M = dict(d_model=768, n_layer=24, d_state=128, head_dim=64, vocab_size=50288, chunk_size=256)


# ----- workers (run in their own process) --------------------------------------------------------------


def gemm_peak(spec: dict | None = None, dtypes=(torch.float32, torch.bfloat16)) -> dict:
    out = {}
    for dtype in dtypes:
        a = torch.randn(4096, 768, dtype=dtype)
        b = torch.randn(768, 3352, dtype=dtype)
        times = timed(lambda a=a, b=b: a @ b, 7)
        out[str(dtype).removeprefix("torch.")] = 2 * 4096 * 768 * 3352 / statistics.median(times) / 1e9
    return {"gflops": out}


def _build_checkpoint(directory: Path, version: int, **shape) -> None:
    """Random weights with transformers' own initialisation (what `Mamba2ForCausalLM(config)` gives), saved in
    the HF layout. The initialisation matters for HF's CPU path: with medstate's init (A drawn in [1, 16])
    HF's Mamba-2 forward ran ~25% faster here than with its own (A = 1..n_heads), as its exp() meets fewer
    denormals; medstate's speed does not depend on it."""
    import transformers

    from medstate.ssm import SSMConfig

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    config = SSMConfig(version=version, **shape)
    hf_config = config.to_hf_dict()
    if "time_step_limit" in hf_config:  # the JSON spelling of infinity is for files, not the constructor
        hf_config["time_step_limit"] = config.dt_limit
    model_type = hf_config.pop("model_type")
    hf_config.pop("architectures")
    torch.manual_seed(0)
    if model_type == "mamba":
        model = transformers.MambaForCausalLM(transformers.MambaConfig(**hf_config))
    else:
        model = transformers.Mamba2ForCausalLM(transformers.Mamba2Config(**hf_config))
    model.save_pretrained(directory)


def _load(impl: str, directory: str):
    if impl == "medstate":
        from medstate.ssm import load_pretrained

        model = load_pretrained(directory)
    else:
        import transformers

        transformers.logging.set_verbosity_error()
        model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return model.eval()


def train_step(spec: dict) -> dict:
    model = _load(spec["impl"], spec["checkpoint"])
    ids = torch.randint(0, model.config.vocab_size, (1, spec["tokens"]), generator=torch.Generator().manual_seed(1))
    baseline = peak_rss_gb()

    fused = spec.get("fused_loss", False)

    def step():
        model.zero_grad(set_to_none=True)
        if fused:  # medstate's chunked vocabulary projection + loss (no [T, V] logits)
            model(ids, labels=ids, return_logits=False).loss.backward()
        else:
            model(ids, labels=ids).loss.backward()

    times = timed(step, spec["repeats"])
    peak = peak_rss_gb()
    return {"times": times, "peak_rss_gb": peak, "rss_before_gb": baseline, **gemm_peak(dtypes=(torch.float32,))}


def forward(spec: dict) -> dict:
    model = _load(spec["impl"], spec["checkpoint"])
    ids = torch.randint(0, model.config.vocab_size, (1, spec["tokens"]), generator=torch.Generator().manual_seed(1))
    dtype = getattr(torch, spec.get("autocast", "float32"))

    def run():
        with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            model(ids)

    times = timed(run, spec["repeats"])
    peak = peak_rss_gb()
    return {"times": times, "peak_rss_gb": peak, **gemm_peak(dtypes=(torch.float32,))}


def decode(spec: dict) -> dict:
    model = _load(spec["impl"], spec["checkpoint"])
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    new_tokens = spec["new_tokens"]
    out: dict = {}
    if spec["impl"] == "medstate":
        states = {}
        for history in spec["histories"]:
            ids = torch.randint(0, vocab, (1, history), generator=generator)
            states[history] = (model.prefill(ids, return_hidden_states=False).state, ids[:, -1])

        def steps(state, token):
            with torch.no_grad():
                start = time.perf_counter()
                for _ in range(new_tokens):
                    result = model.step(token, state)
                    token, state = result.logits.argmax(-1), result.state
                return new_tokens / (time.perf_counter() - start)

        for history in spec["histories"]:
            out[f"step_tokens_per_s_after_{history}"] = []
        steps(*states[spec["histories"][0]])  # warm-up
        for _ in range(spec["repeats"]):  # interleaved, so that drift of the machine hits both alike
            for history in spec["histories"]:
                out[f"step_tokens_per_s_after_{history}"].append(steps(*states[history]))
    # decode rate of generate(): the difference of two generation lengths cancels the prefill
    prompt = torch.randint(0, vocab, (1, spec["prompt"]), generator=generator)
    kwargs = {"do_sample": False} if spec["impl"] == "hf" else {}

    def generate(count):
        extra = {"min_new_tokens": count} if spec["impl"] == "hf" else {}
        with torch.no_grad():
            return statistics.median(
                timed(lambda: model.generate(prompt, max_new_tokens=count, **kwargs, **extra), spec["repeats"])
            )

    out["generate_tokens_per_s"] = [new_tokens / (generate(8 + new_tokens) - generate(8))]
    return out


def long_context(spec: dict) -> dict:
    tokens = spec["tokens"]
    ids = torch.randint(0, 50000, (1, tokens), generator=torch.Generator().manual_seed(1))
    if spec["impl"] == "medstate":
        model = _load("medstate", spec["checkpoint"])
        start = time.perf_counter()
        hidden = model.prefill(ids).hidden_states
    else:
        model = GPT2SizedTransformer().eval()
        start = time.perf_counter()
        with torch.no_grad():
            hidden = model(ids)
    elapsed = time.perf_counter() - start
    assert hidden.shape == (1, tokens, 768)
    return {"times": [elapsed], "peak_rss_gb": peak_rss_gb()}


class GPT2SizedTransformer(torch.nn.Module):
    """GPT-2 small shapes (12 layers, d 768, 12 heads, MLP 3,072) with causal torch SDPA; hidden states only."""

    def __init__(self, layers: int = 12, width: int = 768, heads: int = 12) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50257, width)
        self.heads = heads
        self.blocks = torch.nn.ModuleList(
            torch.nn.ModuleDict(
                {
                    "ln1": torch.nn.LayerNorm(width),
                    "qkv": torch.nn.Linear(width, 3 * width),
                    "proj": torch.nn.Linear(width, width),
                    "ln2": torch.nn.LayerNorm(width),
                    "up": torch.nn.Linear(width, 4 * width),
                    "down": torch.nn.Linear(4 * width, width),
                }
            )
            for _ in range(layers)
        )
        self.ln_f = torch.nn.LayerNorm(width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # learned positions omitted: GPT-2's 1,024 would not reach these lengths
        batch, steps, width = x.shape
        for block in self.blocks:
            q, k, v = block["qkv"](block["ln1"](x)).view(batch, steps, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            attn = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + block["proj"](attn.transpose(1, 2).reshape(batch, steps, width))
            x = x + block["down"](torch.nn.functional.gelu(block["up"](block["ln2"](x))))
        return self.ln_f(x)


WORKERS = {f.__name__: f for f in (gemm_peak, train_step, forward, decode, long_context)}


# ----- parent ----------------------------------------------------------------------------------------


def model_flops_forward(tokens: int, shape: dict) -> float:
    """Forward FLOPs of the Mamba-2 LM: projections and head (2 per MAC) plus the SSD contractions at the
    chunk size the CPU path uses (intra-chunk scores and outputs, chunk states, state read-out)."""
    d, layers, n, p = shape["d_model"], shape["n_layer"], shape["d_state"], shape["head_dim"]
    inner = 2 * d
    heads = inner // p
    q = 64
    proj = d * (2 * inner + 2 * n + heads) + inner * d
    ssd = tokens * (q * n + q * heads * p + 2 * heads * p * n)
    return 2 * (layers * (tokens * proj + ssd) + tokens * d * shape["vocab_size"])


def add_mfu(row: dict, flops: float, tokens: int, peak_gflops: float) -> None:
    """Model-FLOP utilisation against the fp32 GEMM peak measured by the same worker right after its timings
    (the machine's speed drifts within a run; 1.0 = the GEMM floor)."""
    for impl in ("medstate", "hf"):
        t = median(row[impl]) if "times" in row.get(impl, {}) else None
        if t:
            peak = row[impl].get("gflops", {}).get("float32", peak_gflops)
            row[impl]["mfu_vs_fp32_gemm"] = flops / t / 1e9 / peak
            row[impl]["tokens_per_s"] = tokens / t


def rewrite_markdown() -> None:
    """Regenerates backbone.md from backbone.json (after a change to the table layout, without re-measuring)."""
    (RESULTS / "backbone.md").write_text(markdown(json.loads((RESULTS / "backbone.json").read_text())))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="small shapes: checks the script, not the claims")
    parser.add_argument("--only", nargs="*", default=None, help="subset of cases")
    parser.add_argument("--full-transformer", action="store_true", help="also run the Transformer at 65,536")
    parser.add_argument("--markdown-only", action="store_true", help="rewrite backbone.md from backbone.json")
    args = parser.parse_args()
    if args.markdown_only:
        rewrite_markdown()
        return
    if args.worker:
        spec = json.loads(args.worker)
        torch.manual_seed(0)
        print(json.dumps(WORKERS[spec["worker"]](spec)))
        return

    quick = args.quick
    cases = args.only or ["m1_train", "m2_train", "m2_forward", "decode", "long_context"]
    m2_shape = dict(M2_130M, n_layer=2) if quick else M2_130M
    rows: list[dict] = []
    report: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(), "quick": quick}
    tmp = Path(tempfile.mkdtemp(prefix="medstate-bench-"))
    report["gemm_gflops"] = run_worker(__file__, {"worker": "gemm_peak"}, 300)["gflops"]
    print(f"GEMM peak measured now (4096x768x3352): {report['gemm_gflops']}", flush=True)

    def compare(name, spec, repeats_ours, repeats_hf, timeout=900, extra=None, hf_result=None):
        ours = run_worker(__file__, {**spec, "impl": "medstate", "repeats": repeats_ours}, timeout)
        hf = hf_result or run_worker(__file__, {**spec, "impl": "hf", "repeats": repeats_hf}, timeout)
        row = {"case": name, "medstate": ours, "hf": hf, **(extra or {})}
        t_ours, t_hf = median(ours), median(hf)
        if t_ours and t_hf:
            row["speedup"] = t_hf / t_ours
        if "peak_rss_gb" in ours and "peak_rss_gb" in hf:
            row["peak_rss_ratio"] = ours["peak_rss_gb"] / hf["peak_rss_gb"]
        rows.append(row)
        print(format_row(row), flush=True)
        return row

    if "m1_train" in cases:
        for vocab in (4096, 50280):
            path = tmp / f"m1-{vocab}"
            _build_checkpoint(path, 1, d_model=256, n_layer=4, d_state=16, vocab_size=vocab)
            tokens = 128 if quick else 512
            compare(
                f"Mamba-1 d256x4, {tokens} tok, vocab {vocab}, fwd+bwd",
                {"worker": "train_step", "checkpoint": str(path), "tokens": tokens},
                5,
                3,
            )
    path130 = tmp / "m2-130m"
    if {"m2_train", "m2_forward", "decode", "long_context"} & set(cases):
        _build_checkpoint(path130, 2, **m2_shape)
    if "m2_train" in cases:
        tokens = 256 if quick else 1024
        spec = {"worker": "train_step", "checkpoint": str(path130), "tokens": tokens}
        row = compare(f"Mamba-2 130M, {tokens} tok, fwd+bwd (full logits + loss, as HF)", spec, 3, 2)
        fused = compare(
            f"Mamba-2 130M, {tokens} tok, fwd+bwd (medstate fused loss, return_logits=False)",
            {**spec, "fused_loss": True},
            3,
            0,
            hf_result=row["hf"],
        )
        # backward = 2x forward GEMM work
        for r in (row, fused):
            add_mfu(r, 3 * model_flops_forward(tokens, m2_shape), tokens, report["gemm_gflops"]["float32"])
    if "m2_forward" in cases:
        tokens = 512 if quick else 4096
        for dtype in ("float32", "bfloat16"):
            row = compare(
                f"Mamba-2 130M, {tokens} tok, forward, {dtype}",
                {"worker": "forward", "checkpoint": str(path130), "tokens": tokens, "autocast": dtype},
                3,
                2,
            )
            add_mfu(row, model_flops_forward(tokens, m2_shape), tokens, report["gemm_gflops"]["float32"])
    if "decode" in cases:
        histories = [512, 2048] if quick else [512, 16384]
        spec = {"worker": "decode", "checkpoint": str(path130), "histories": histories, "new_tokens": 32, "prompt": 512}
        ours = run_worker(__file__, {**spec, "impl": "medstate", "repeats": 7}, 1200)
        hf = run_worker(__file__, {**spec, "impl": "hf", "repeats": 2}, 1200)
        row = {"case": "decode (tokens/s)", "medstate": ours, "hf": hf}
        if "error" not in ours:
            short, long = (statistics.median(ours[f"step_tokens_per_s_after_{h}"]) for h in histories)
            row["long_over_short_step_rate"] = long / short
            if "error" not in hf:
                row["generate_speedup"] = median(ours, "generate_tokens_per_s") / median(hf, "generate_tokens_per_s")
        rows.append(row)
        print(format_row(row), flush=True)
    if "long_context" in cases:
        tokens = 8192 if quick else 65536
        ours = run_worker(
            __file__, {"worker": "long_context", "impl": "medstate", "checkpoint": str(path130), "tokens": tokens}, 1800
        )
        rows.append({"case": f"long context {tokens} tok, Mamba-2 130M hidden states", "medstate": ours})
        print(format_row(rows[-1]), flush=True)
        lengths = [2048, 8192] if quick else [4096, 16384] + ([65536] if args.full_transformer else [])
        for length in lengths:
            result = run_worker(__file__, {"worker": "long_context", "impl": "transformer", "tokens": length}, 1800)
            rows.append(
                {"case": f"long context {length} tok, GPT-2-small-sized Transformer (SDPA)", "transformer": result}
            )
            print(format_row(rows[-1]), flush=True)

    measured = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["rows"] = [{**row, "measured": measured} for row in rows]
    saved = RESULTS / "backbone.json"
    if args.only and saved.is_file():  # a partial run replaces its own rows and keeps the others
        previous = json.loads(saved.read_text())
        fresh = {row["case"]: row for row in report["rows"]}
        kept = [fresh.pop(row["case"], row) for row in previous["rows"]]
        report = {**previous, "rows": kept + list(fresh.values())}
    if not quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "backbone.json").write_text(json.dumps(report, indent=2) + "\n")
        (RESULTS / "backbone.md").write_text(markdown(report))
    print()
    print(markdown(report))


def format_row(row: dict) -> str:
    parts = [row["case"]]
    for impl in ("medstate", "hf", "transformer"):
        if impl in row:
            result = row[impl]
            if "error" in result:
                parts.append(f"{impl}: {result['error']}")
            elif "times" in result:
                parts.append(f"{impl} {median(result):.3f} s, peak {result.get('peak_rss_gb', 0):.2f} GB")
            else:
                parts.append(f"{impl} " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in result.items()))
    for key in ("speedup", "peak_rss_ratio", "long_over_short_step_rate", "generate_speedup"):
        if key in row:
            parts.append(f"{key} {row[key]:.2f}")
    return " | ".join(parts)


def markdown(report: dict) -> str:
    lines = [
        "# Backbone benchmark: medstate vs Hugging Face transformers (same weights, same run)",
        "",
        f"torch {report['torch']}, {report['threads']} threads; GEMM peak at the start of the full run (GFLOP/s; "
        "MFU uses the peak each worker measures right after its own timings; rows re-measured by a run with "
        "--only carry its date): " + ", ".join(f"{k} {v:.0f}" for k, v in report["gemm_gflops"].items()),
        "",
        "| case | medstate | HF transformers | ratio | measured |",
        "|---|---|---|---|---|",
    ]
    for row in report["rows"]:

        def cell(result):
            if result is None:
                return ""
            if "error" in result:
                return result["error"]
            if "times" in result:
                text = f"{median(result):.3f} s (median of {len(result['times'])})"
                text += f", peak RSS {result['peak_rss_gb']:.2f} GB"
                if "mfu_vs_fp32_gemm" in result:
                    text += f", {result['tokens_per_s']:.0f} tok/s, MFU {100 * result['mfu_vs_fp32_gemm']:.0f}%"
                return text
            return "; ".join(f"{k} {statistics.median(v):.1f}" for k, v in result.items())

        ratios = [
            f"{k.replace('_', ' ')} **{row[k]:.2f}**"
            for k in ("speedup", "peak_rss_ratio", "long_over_short_step_rate", "generate_speedup")
            if k in row
        ]
        hf_mfu = (row.get("hf") or {}).get("mfu_vs_fp32_gemm")
        if hf_mfu and "bfloat16" not in row["case"]:
            ratios.append(f"speedup ceiling {1 / hf_mfu:.2f}")
        other = row.get("medstate") or row.get("transformer")
        cells = [row["case"], cell(other), cell(row.get("hf")), "; ".join(ratios), row.get("measured", "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "speedup = HF median time / medstate median time; peak RSS ratio = medstate / HF (whole worker process);",
        "long over short step rate = step() tokens/s after the long prefill / after the 512-token prefill.",
        "speedup ceiling = 1 / HF's MFU: the speedup of an implementation doing the same model FLOPs at 100% of the",
        "fp32 GEMM peak, i.e. every elementwise op, scan and reduction free. A target above it cannot be met in fp32",
        "on this machine; bf16 does not raise it here (no AMX or AVX512-BF16: bf16 GEMM runs below fp32).",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
