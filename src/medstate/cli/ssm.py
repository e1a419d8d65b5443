"""`medstate ssm`: the state-space engine's checkpoints, generation and demo (`medstate.ssm`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medstate.cli.common import console, summary
from medstate.ssm import load_pretrained
from medstate.ssm.demo import DemoConfig, run_demo
from medstate.ssm.generate import continue_prompt

app = typer.Typer(no_args_is_help=True, add_completion=False)


@app.command("info")
def ssm_info(checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory (HF or mamba_ssm layout)")]) -> None:
    """Describe a local checkpoint: architecture, parameter count, layout."""
    model = load_pretrained(checkpoint)
    config = model.config
    rows = {"mixer": f"Mamba-{config.version}", "parameters": sum(p.numel() for p in model.parameters())}
    rows.update({k: v for k, v in config.to_hf_dict().items() if k not in ("architectures",)})
    summary(str(checkpoint), rows)


@app.command("convert")
def ssm_convert(
    source: Annotated[Path, typer.Argument(help="checkpoint directory (HF or mamba_ssm native layout)")],
    destination: Annotated[Path, typer.Argument(help="output directory (HF layout, safetensors)")],
) -> None:
    """Rewrite a checkpoint in the Hugging Face layout with safetensors (loads in transformers)."""
    model = load_pretrained(source)
    model.save_pretrained(destination)
    summary("converted", {"from": source, "to": destination, "parameters": sum(p.numel() for p in model.parameters())})


@app.command("generate")
def ssm_generate(
    checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory")],
    ids: Annotated[str, typer.Option(help="prompt token ids, comma separated")] = "",
    prompt: Annotated[str, typer.Option(help="prompt text (needs --tokenizer)")] = "",
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer.json for --prompt")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 32,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    seed: int = 0,
) -> None:
    """Continue a prompt: one prefill, then one constant-cost step per token."""
    console.print(continue_prompt(checkpoint, ids, prompt, tokenizer, max_new_tokens, temperature, top_p, seed))


@app.command("demo")
def ssm_demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo-ssm"),
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 150,
) -> None:
    """Train a small Mamba-2 on synthetic sequences, save/reload it, stream a 16k-token history."""
    metrics = run_demo(out, DemoConfig(train_steps=steps))
    summary(f"ssm demo → {out}", metrics)
    console.print(json.dumps({"metrics": str(out / "metrics.json")}))
