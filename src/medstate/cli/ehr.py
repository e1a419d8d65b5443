"""`medstate ehr`: EhrMamba's patient sequences, tasks, training, evaluation, attributions and forecasts
(`medstate.ehr`, `medstate.interp`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from medstate.cli.common import console, counting, stages, steps, summary, table
from medstate.ehr.benchmark import BenchmarkSettings, run_benchmark
from medstate.ehr.demo import run_demo
from medstate.ehr.evaluate import evaluate_models
from medstate.ehr.forecast import ForecastConfig, evaluate_forecast, write_forecast
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.training import EhrTrainSettings, load_model, merge_adapter, run_training
from medstate.eval.report import markdown_table
from medstate.interp import explain
from medstate.loading import parse_list

app = typer.Typer(no_args_is_help=True, add_completion=False)

MaxSteps = Annotated[int, typer.Option(min=1, help="optimizer steps")]
TokenBudget = Annotated[int, typer.Option(min=16, help="tokens per packed batch")]
GradAccumulation = Annotated[int, typer.Option(min=1, help="batches per optimizer step (on every process)")]
Parallel = Annotated[
    str, typer.Option(help="under torchrun: ddp (a replica per process) or fsdp (weights and optimizer sharded)")
]


Config = Annotated[
    Path | None,
    typer.Option(
        help="settings YAML (model, sizes, init, tasks, token_budget, lora, train: {…}); options given override it"
    ),
]
# option → its dotted settings key (`EhrTrainSettings`)
TRAIN_KEYS = {"model_kind": "model", "init": "init", "tasks": "tasks", "token_budget": "token_budget"}
TRAIN_KEYS |= {name: f"sizes.{name}" for name in ("d_model", "n_layer", "dropout", "ssm_version")}
TRAIN_KEYS |= {
    name: f"train.{name}"
    for name in ("max_steps", "lr", "warmup_steps", "seed", "bf16", "save_every", "grad_accumulation", "parallel")
}
LORA_OPTIONS = ("lora", "lora_targets", "lora_rank", "lora_alpha")


def _train(ctx: typer.Context, stage: str, prepared: Path, run_dir: Path, config: Path | None, values: dict) -> None:
    """Without --config every option is a setting; with it, only the options given override the file's."""
    # by name: typer carries its own copy of click, whose ParameterSource is not click's
    given = {name for name in ctx.params if ctx.get_parameter_source(name).name not in ("DEFAULT", "DEFAULT_MAP")}
    chosen = {name: value for name, value in values.items() if config is None or name in given}
    overrides = {TRAIN_KEYS[name]: value for name, value in chosen.items() if name in TRAIN_KEYS}
    if "tasks" in overrides:
        overrides["tasks"] = parse_list(overrides["tasks"], str, "--tasks") if overrides["tasks"] else None
    if chosen.get("lora"):  # adapters: --lora-* over the file's lora settings (if any)
        targets = chosen.get("lora_targets")
        overrides["lora"] = {"targets": parse_list(targets, str, "--lora-targets") if targets else None,
                             "rank": chosen.get("lora_rank"), "alpha": chosen.get("lora_alpha")}  # fmt: skip
        overrides["lora"] = {key: value for key, value in overrides["lora"].items() if value is not None}
    settings = EhrTrainSettings.read(config, overrides, stage)
    if chosen.get("lora") is False:  # --no-lora: no adapters, whatever the file says
        settings = dataclasses.replace(settings, lora=None)
    with steps(stage) as progress:
        result = run_training(stage, prepared, run_dir, settings, progress)
    summary(
        f"{stage}: {run_dir}",
        {
            "steps": result.steps,
            "resumed from step": result.resumed_from if result.resumed_from is not None else "-",
            "last loss": round(result.last_loss, 5),
            "seconds": round(result.seconds, 1),
            "checkpoint": str(run_dir / "checkpoints" / "last"),
        },
    )


@app.command("prepare")
def ehr_prepare(
    meds_dir: Annotated[
        list[Path], typer.Argument(help="MEDS dataset(s) (from `medstate data convert`) with a train split")
    ],
    output: Annotated[
        Path, typer.Option("--out", "-o", help="directory for vocabulary, value bins, sequences and labels")
    ],
    tasks: Annotated[Path | None, typer.Option(help="task YAML (default: the six EhrMamba tasks)")] = None,
    max_length: Annotated[int, typer.Option(min=8, help="tokens per sequence (the most recent are kept)")] = 2048,
    visit: Annotated[str, typer.Option(help="visit definition: auto, admission, encounter or day")] = "auto",
    value_bins: Annotated[int, typer.Option(min=1, help="quantile bins per numeric code")] = 5,
    min_count: Annotated[
        int, typer.Option(min=1, help="training occurrences a token needs to enter the vocabulary")
    ] = 1,
    max_samples_per_subject: Annotated[
        int | None,
        typer.Option(min=1, help="at most this many prediction times per subject and task (uniform, label-blind)"),
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the --max-samples-per-subject draw")] = 0,
    prompt: Annotated[
        str,
        typer.Option(help="task token first and last (both: EhrMamba) or last only (last: one state per patient)"),
    ] = "both",
    workers: Annotated[int, typer.Option(min=1, help="processes for the per-shard work (the output is the same)")] = 1,
    shard_subjects: Annotated[
        int, typer.Option(min=1, help="most subjects a worker holds at once (larger shards are split by subject)")
    ] = 1000,
    executor: Annotated[
        str, typer.Option(help="local (--workers processes) or ray (Ray tasks; data and --out on a shared filesystem)")
    ] = "local",
    address: Annotated[
        str | None, typer.Option(help="the Ray cluster (host:port) for --executor ray; default: start one here")
    ] = None,
) -> None:
    """Build patient sequences, fit vocabulary and value bins on the training split, and label the tasks."""

    config = PrepareConfig(
        max_length,
        visit,
        value_bins,
        min_count,
        str(tasks) if tasks else None,
        max_samples_per_subject,
        seed,
        prompt=prompt,
    )
    with stages() as progress:
        done = prepare(meds_dir, output, config, progress, workers, shard_subjects, executor, address)
    rows = [[name, f"{counts['n']:,}", f"{counts['positives']:,}"] for name, counts in done.samples.items()]
    table(f"tasks in {output}", ["task", "samples", "positives"], rows)
    summary(
        "summary",
        {
            "subjects": ", ".join(f"{k} {v}" for k, v in sorted(done.subjects.items())),
            "vocabulary": f"{done.vocabulary:,} tokens",
            "output": str(done.output),
        },
    )


@app.command("pretrain")
def ehr_pretrain(
    ctx: typer.Context,
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (resumes from its checkpoint if there is one)")],
    model_kind: Annotated[
        str, typer.Option("--model", help="ehrmamba (next-event), or bert / bigbird (masked language model)")
    ] = "ehrmamba",
    d_model: Annotated[int | None, typer.Option(min=8, help="width (default 128; a resumed run keeps its own)")] = None,
    n_layer: Annotated[int | None, typer.Option(min=1, help="layers (default 4)")] = None,
    dropout: Annotated[float | None, typer.Option(min=0.0, max=0.9, help="dropout rate (default 0.1)")] = None,
    ssm_version: Annotated[
        int | None, typer.Option(min=1, max=2, help="EhrMamba mixer: 1 Mamba (paper, default), 2 Mamba-2")
    ] = None,
    max_steps: MaxSteps = 200,
    lr: Annotated[float, typer.Option(min=0.0)] = 1e-3,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 20,
    token_budget: TokenBudget = 8192,
    save_every: Annotated[int, typer.Option(min=1, help="steps between checkpoints")] = 50,
    seed: int = 0,
    bf16: Annotated[bool, typer.Option(help="bf16 autocast (the SSM state stays fp32)")] = False,
    grad_accumulation: GradAccumulation = 1,
    parallel: Parallel = "ddp",
    config: Config = None,
) -> None:
    """Pretrain on the training split: EhrMamba by next-event prediction, the Transformer baselines by MLM."""

    values = dict(locals())
    _train(ctx, "pretrain", prepared, run_dir, config, {k: values[k] for k in TRAIN_KEYS if k in values})


@app.command("finetune")
def ehr_finetune(
    ctx: typer.Context,
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (resumes from its checkpoint if there is one)")],
    init: Annotated[Path | None, typer.Option(help="pretrained checkpoint directory to start from")] = None,
    tasks: Annotated[str | None, typer.Option(help="comma-separated tasks (default: all, prompted multitask)")] = None,
    model_kind: Annotated[
        str, typer.Option("--model", help="without --init: ehrmamba, or a baseline (lstm, bert, bigbird)")
    ] = "ehrmamba",
    max_steps: MaxSteps = 200,
    lr: Annotated[float, typer.Option(min=0.0)] = 5e-4,
    warmup_steps: Annotated[int, typer.Option(min=0)] = 20,
    token_budget: TokenBudget = 8192,
    save_every: Annotated[int, typer.Option(min=1)] = 50,
    seed: int = 0,
    bf16: bool = False,
    grad_accumulation: GradAccumulation = 1,
    parallel: Parallel = "ddp",
    lora: Annotated[
        bool, typer.Option(help="train LoRA adapters on --init's projections and the classifier whole; the rest frozen")
    ] = False,
    lora_targets: Annotated[
        str | None, typer.Option(help="comma-separated LoRA targets (default: every projection: in_proj, out_proj…)")
    ] = None,
    lora_rank: Annotated[int, typer.Option(min=1)] = 16,
    lora_alpha: Annotated[float, typer.Option(min=0.0)] = 32.0,
    config: Config = None,
) -> None:
    """Prompted multitask finetuning (or single-task with --tasks NAME) of an EhrMamba model. With --lora the
    run's checkpoints are adapters (PEFT's format, naming --init); `medstate ehr merge` folds them in."""

    values = dict(locals())
    _train(
        ctx, "finetune", prepared, run_dir, config, {k: values[k] for k in (*TRAIN_KEYS, *LORA_OPTIONS) if k in values}
    )


@app.command("merge")
def ehr_merge(
    adapter: Annotated[Path, typer.Argument(help="checkpoint of a `finetune --lora` run (adapters + classifier)")],
    out: Annotated[Path, typer.Argument(help="directory for the merged model")],
) -> None:
    """Fold LoRA adapters into their base model: a plain EHR checkpoint with the base's prepared files."""

    summary("merge", {"model": str(merge_adapter(adapter, out))})


@app.command("evaluate")
def ehr_evaluate(
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    output: Annotated[Path, typer.Argument(help="run directory for metrics.json, predictions.parquet, report.*")],
    model: Annotated[list[str], typer.Option(help="NAME=CHECKPOINT[@SEED] of a finetuned model (repeatable)")],
    bootstrap: Annotated[int, typer.Option(min=10, help="subject-bootstrap resamples for the 95% intervals")] = 1000,
) -> None:
    """Score the tuning and held-out splits with each model and write the report (AUROC, AUPRC, F1, calibration)."""

    result = evaluate_models(prepared, output, model, bootstrap)
    console.print(markdown_table(result["summary"]))
    console.print(f"report: {output / 'report.html'}")


@app.command("explain")
def ehr_explain(
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    checkpoint: Annotated[Path, typer.Argument(help="a finetuned EhrMamba checkpoint")],
    output: Annotated[Path, typer.Argument(help="directory for attributions (CSV) and timeline plots (PNG)")],
    task: Annotated[str, typer.Option(help="the task whose probability is explained")],
    subject: Annotated[
        int | None, typer.Option(help="explain this subject's samples (default: the top-scored positives)")
    ] = None,
    split: Annotated[str, typer.Option(help="train, tuning or held_out")] = "held_out",
    count: Annotated[int, typer.Option(min=1, help="samples to explain without --subject")] = 3,
    steps: Annotated[int, typer.Option(min=8, help="integration steps")] = 64,
    top: Annotated[int, typer.Option(min=1, help="tokens listed and labelled per sample")] = 10,
) -> None:
    """Integrated gradients from a task probability to each event of a patient's history, with a timeline plot."""

    with counting("integrated gradients") as progress:
        results = explain(prepared, load_model(checkpoint), output, task, subject, split, count, steps, top, progress)
    rows = [
        [item.name, f"{item.attribution.probability:.3f}", str(item.label),
         ", ".join(f"{token} ({score:+.3f})" for token, score in item.top(5))]
        for item in results
    ]  # fmt: skip
    table(f"{task}: largest attributions", ["sample", "p", "label", "top events (attribution)"], rows, left=4)
    summary("explain", {"samples": len(results), "integration steps": steps, "output": str(output)})


@app.command("forecast")
def ehr_forecast(
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    checkpoint: Annotated[Path, typer.Argument(help="a pretrained (or finetuned) EhrMamba checkpoint")],
    output: Annotated[Path, typer.Argument(help="directory for forecast.json, forecast.md, per-subject recall")],
    split: Annotated[str, typer.Option(help="the subjects to forecast")] = "held_out",
    samples: Annotated[int, typer.Option(min=1, help="sampled next visits per subject")] = 16,
    temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy")] = 1.0,
    top_p: Annotated[float, typer.Option(min=0.01, max=1.0, help="nucleus sampling mass")] = 0.95,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="tokens per sampled visit at most")] = 64,
    k: Annotated[str, typer.Option(help="comma-separated k of recall@k")] = "5,10,20",
    seed: int = 0,
) -> None:
    """Sample each subject's next visit and score next-visit code recall@k against code-frequency baselines."""

    config = ForecastConfig(samples, temperature, top_p, max_new_tokens, tuple(parse_list(k, int, "--k")), seed)
    with counting("sampling next visits") as progress:
        result = evaluate_forecast(load_model(checkpoint), prepared, split, config, progress)
    console.print(write_forecast(result, output))
    summary(
        "forecast",
        {"subjects": result["subjects"], "mean codes in the true next visit": round(result["mean_true_codes"], 1),
         "sampled visits that closed with [VE]": f"{result['complete_visits']:.1%}", "output": str(output)},
    )  # fmt: skip


@app.command("benchmark")
def ehr_benchmark(
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (a re-run resumes and skips finished cells)")],
    settings: Annotated[
        Path | None, typer.Option(help="YAML with BenchmarkSettings fields (seeds, models, sizes, steps)")
    ] = None,
    seeds: Annotated[str | None, typer.Option(help="comma-separated seeds (overrides the settings)")] = None,
    models: Annotated[str | None, typer.Option(help="comma-separated model names to run (default: all)")] = None,
) -> None:
    """The full protocol: every model × task × seed (pretraining, finetuning, baselines) into one report."""

    chosen = BenchmarkSettings.from_yaml(settings, {"seeds": parse_list(seeds, int, "--seeds") if seeds else None})
    if models:
        chosen.select_models(parse_list(models, str, "--models"))
    with steps("training", remaining=False) as progress:
        result = run_benchmark(prepared, run_dir, chosen, say=console.print, progress=progress)
    console.print(markdown_table(result["summary"]))
    seconds = sum(r["seconds"] for r in result["timings"] if r["stage"] == "total")
    summary("benchmark", {"models": len(chosen.models), "seeds": len(chosen.seeds), "compute (s)": round(seconds),
                          "report": str(result["report"])})  # fmt: skip


@app.command("demo")
def ehr_demo(
    data_dir: Annotated[Path, typer.Option(help="the shipped demo data")] = Path("data/demo"),
    out: Annotated[Path, typer.Option(help="run directory (replaced)")] = Path("runs/demo"),
) -> None:
    """The whole EHR path on the shipped demo data: convert, prepare, pretrain, prompted finetune, evaluate."""

    result = run_demo(data_dir, out, say=console.print)
    console.print(markdown_table(result["summary"]))
    summary("demo", {**{k: f"{v} s" for k, v in result["timings"].items()}, "report": str(result["report"])})
