"""The `medstate` command. Sub-commands mirror the packages (`medstate ssm …` ↔ `medstate.ssm`).

Errors a user can cause (bad path, malformed file) print one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from medstate import __version__
from medstate.errors import MedstateError
from medstate.loading import compile_pattern, parse_list

console = Console()


class _Group(TyperGroup):
    """Turns a MedstateError raised anywhere below into one line on stderr and exit code 2."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MedstateError as err:
            typer.echo(f"medstate: error: {err}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(
    cls=_Group, help="Mamba (selective state-space) foundation models for medicine.", no_args_is_help=True
)
ssm_app = typer.Typer(help="The state-space engine: checkpoints, generation, a demo.", no_args_is_help=True)
app.add_typer(ssm_app, name="ssm")
data_app = typer.Typer(
    help="Clinical event data: MIMIC-IV CSV, FHIR R4 and MEDS in; validated MEDS out.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
ehr_app = typer.Typer(help="EhrMamba: patient sequences, tasks, models, evaluation.", no_args_is_help=True)
app.add_typer(ehr_app, name="ehr")
text_app = typer.Typer(
    help="Language models over medical text: tokenizers, continued pretraining, evaluation.", no_args_is_help=True
)
app.add_typer(text_app, name="text")
vision_app = typer.Typer(
    help="Images and volumes: Vision Mamba classification, U-Mamba segmentation, baselines.", no_args_is_help=True
)
app.add_typer(vision_app, name="vision")


@app.command()
def version() -> None:
    """Print the medstate version."""
    console.print(__version__)


def _summary(title: str, rows: dict) -> None:
    table = Table(title=title, show_header=False)
    for key, value in rows.items():
        table.add_row(str(key), f"{value:.4g}" if isinstance(value, float) else str(value))
    console.print(table)


@ssm_app.command("info")
def ssm_info(checkpoint: Annotated[Path, typer.Argument(help="checkpoint directory (HF or mamba_ssm layout)")]) -> None:
    """Describe a local checkpoint: architecture, parameter count, layout."""
    from medstate.ssm.model import load_pretrained

    model = load_pretrained(checkpoint)
    config = model.config
    rows = {"mixer": f"Mamba-{config.version}", "parameters": sum(p.numel() for p in model.parameters())}
    rows.update({k: v for k, v in config.to_hf_dict().items() if k not in ("architectures",)})
    _summary(str(checkpoint), rows)


@ssm_app.command("convert")
def ssm_convert(
    source: Annotated[Path, typer.Argument(help="checkpoint directory (HF or mamba_ssm native layout)")],
    destination: Annotated[Path, typer.Argument(help="output directory (HF layout, safetensors)")],
) -> None:
    """Rewrite a checkpoint in the Hugging Face layout with safetensors (loads in transformers)."""
    from medstate.ssm.model import load_pretrained

    model = load_pretrained(source)
    model.save_pretrained(destination)
    _summary("converted", {"from": source, "to": destination, "parameters": sum(p.numel() for p in model.parameters())})


@ssm_app.command("generate")
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
    import torch

    from medstate.ssm.model import load_pretrained

    encoder = None
    if prompt:
        if tokenizer is None:
            raise MedstateError("--prompt needs --tokenizer PATH/tokenizer.json (or pass --ids)")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise MedstateError("--prompt needs the 'tokenizers' package (pip install tokenizers)") from None
        if not tokenizer.is_file():
            raise MedstateError(f"tokenizer file {tokenizer} does not exist")
        encoder = Tokenizer.from_file(str(tokenizer))
        prompt_ids = encoder.encode(prompt).ids
    else:
        prompt_ids = parse_list(ids, int, "--ids")
    if not prompt_ids:
        raise MedstateError("give a prompt with --ids 1,2,3 or --prompt TEXT --tokenizer FILE")
    model = load_pretrained(checkpoint)
    if max(prompt_ids) >= model.config.vocab_size or min(prompt_ids) < 0:
        raise MedstateError(f"prompt ids must lie in [0, {model.config.vocab_size})")
    output = model.generate(
        torch.tensor([prompt_ids]),
        max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=model.config.eos_token_id if encoder is not None else None,
        generator=torch.Generator().manual_seed(seed),
    )[0, len(prompt_ids) :].tolist()
    console.print(encoder.decode(output) if encoder is not None else ",".join(map(str, output)))


@ssm_app.command("demo")
def ssm_demo(
    out: Annotated[Path, typer.Option(help="run directory")] = Path("runs/demo-ssm"),
    steps: Annotated[int, typer.Option(min=1, help="training steps")] = 150,
) -> None:
    """Train a small Mamba-2 on synthetic sequences, save/reload it, stream a 16k-token history."""
    from medstate.ssm.demo import DemoConfig, run_demo

    metrics = run_demo(out, DemoConfig(train_steps=steps))
    _summary(f"ssm demo → {out}", metrics)
    console.print(json.dumps({"metrics": str(out / "metrics.json")}))


@data_app.command("describe")
def data_describe(
    dataset: Annotated[Path, typer.Argument(help="MEDS dataset directory (data/ and metadata/)")],
    top: Annotated[int, typer.Option(min=1, help="code families to list")] = 10,
) -> None:
    """Subjects, events, time span, split sizes and the most frequent code families of a MEDS dataset."""
    from medstate.data import describe

    summary = describe(dataset, top=top)
    _summary(
        str(dataset),
        {
            "subjects": summary.subjects,
            "events": summary.events,
            "time span": f"{summary.first_time} → {summary.last_time}",
            **{
                f"split {k or '(none)'}": f"{summary.subjects_per_split[k]} subjects, {v} events"
                for k, v in sorted(summary.events_per_split.items())
            },
        },
    )
    table = Table(title="top code families")
    table.add_column("family")
    table.add_column("events", justify="right")
    for family, count in summary.top_code_families:
        table.add_row(family, str(count))
    console.print(table)


@data_app.command("convert")
def data_convert(
    input: Annotated[Path, typer.Argument(help="MIMIC-IV root (hosp/, icu/), FHIR file or directory, or MEDS dataset")],
    output: Annotated[Path, typer.Argument(help="directory for the MEDS dataset (data/, metadata/, report.json)")],
    format: Annotated[str, typer.Option("--format", "-f", help="input format: mimic-iv, fhir or meds")],
    strict: Annotated[bool, typer.Option(help="stop at the first bad record instead of skipping and counting")] = False,
    shards: Annotated[
        int | None, typer.Option(min=1, help="subject shards per split (default: from the input size)")
    ] = None,
    seed: Annotated[int, typer.Option(help="seed of the subject-level train/tuning/held_out split")] = 0,
    split: Annotated[
        str, typer.Option(help="train,tuning,held_out fractions of subjects (kept from the input for MEDS)")
    ] = "0.8,0.1,0.1",
    tables: Annotated[
        str | None, typer.Option(help="MIMIC-IV only: comma-separated tables to read (default: all present)")
    ] = None,
    exclude_files: Annotated[
        list[str] | None, typer.Option(help="FHIR only: leave out files whose name matches this glob (repeatable)")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="replace OUTPUT if medstate wrote it (never anything else)")] = False,
    workers: Annotated[
        int | None, typer.Option(min=0, help="processes sorting shards at the end (default ≤2; 0: less memory)")
    ] = None,
    timezone: Annotated[
        str, typer.Option(help="FHIR: the zone times are written in (offsets converted, naive times read as in it)")
    ] = "UTC",
) -> None:
    """Convert clinical data into a MEDS dataset; bad records are counted by reason in OUTPUT/report.json."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from medstate.data.convert import convert

    fractions = tuple(parse_list(split, float, "--split"))
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console, transient=True
    ) as bar:
        task = bar.add_task("reading", total=None)
        read = [0]

        def progress(source: str, rows: int) -> None:
            read[0] += rows
            bar.update(task, description=f"reading {source}: {read[0]:,} records")

        result = convert(
            input,
            output,
            format,
            strict=strict,
            shards=shards,
            seed=seed,
            split_fractions=fractions,
            tables=parse_list(tables, str, "--tables") if tables else None,
            exclude_files=exclude_files,
            overwrite=overwrite,
            workers=workers,
            timezone=timezone,
            progress=progress,
        )
    table = Table(title=f"{format} → {output}")
    for column in ("source", "read", "converted", "ignored", "skipped", "events written", "values reduced"):
        table.add_column(column, justify="left" if column == "source" else "right")
    for name, counts in sorted(result.report.sources.items()):
        skipped = sum(counts.skipped.values())
        reduced = sum(counts.coerced.values())
        ignored = result.report.ignored[name]
        converted = "-" if counts.converted is None else f"{counts.converted:,}"  # not counted by this reader
        table.add_row(name, f"{counts.read:,}", converted, f"{ignored:,}", f"{skipped:,}",
                      f"{counts.written:,}", f"{reduced:,}")  # fmt: skip
    console.print(table)
    summary = result.summary
    _summary(
        "summary",
        {
            "subjects": f"{summary.subjects:,}",
            "events": f"{summary.events:,}",
            "codes": f"{summary.codes:,}",
            "splits": ", ".join(f"{k} {v}" for k, v in sorted(summary.subjects_per_split.items())),
            "shards per split": summary.shards,
            "records skipped": f"{result.report.total_skipped:,} (reasons in report.json)",
            "files lost": f"{len(result.report.lost_files)} (listed in report.json)",
            "report": str(summary.output / "report.json"),
        },
    )


@data_app.command("compare")
def data_compare(
    candidate: Annotated[Path, typer.Argument(help="MEDS dataset to check")],
    reference: Annotated[Path, typer.Argument(help="reference MEDS dataset (e.g. the official MIMIC-IV MEDS)")],
    exclude_codes: Annotated[str | None, typer.Option(help="regular expression: codes left out on both sides")] = None,
) -> None:
    """Per code family: share of reference (subject, time, code) rows reproduced, extra rows, numeric agreement."""
    import polars as pl

    from medstate.data.compare import compare_meds

    exclude = None
    if exclude_codes:
        exclude = pl.col("code").str.contains(compile_pattern(exclude_codes, "--exclude-codes").pattern)
    agreement = compare_meds(candidate, reference, exclude=exclude)
    table = Table(title=f"{candidate} vs {reference} (reference subjects)")
    for column in ("family", "reference", "candidate", "matched", "recall", "extra", "numeric equal"):
        table.add_column(column, justify="left" if column == "family" else "right")
    for row in agreement.table.iter_rows(named=True):
        table.add_row(
            row["family"],
            f"{row['reference']:,}",
            f"{row['candidate']:,}",
            f"{row['matched']:,}",
            f"{row['recall']:.2%}" if row["reference"] else "-",
            f"{row['extra']:.2%}" if row["reference"] else "-",
            f"{row['numeric_agreement']:.2%}" if row["matched"] else "-",
        )
    console.print(table)


@ehr_app.command("prepare")
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
) -> None:
    """Build patient sequences, fit vocabulary and value bins on the training split, and label the tasks."""
    from rich.progress import Progress

    from medstate.ehr.prepare import PrepareConfig, prepare

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
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("patient sequences", total=None)
        summary = prepare(
            meds_dir, output, config, progress=lambda done, total: bar.update(task, completed=done, total=total)
        )
    table = Table(title=f"tasks in {output}")
    for column in ("task", "samples", "positives"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, counts in summary.samples.items():
        table.add_row(name, f"{counts['n']:,}", f"{counts['positives']:,}")
    console.print(table)
    _summary(
        "summary",
        {
            "subjects": ", ".join(f"{k} {v}" for k, v in sorted(summary.subjects.items())),
            "vocabulary": f"{summary.vocabulary:,} tokens",
            "output": str(summary.output),
        },
    )


def _train_options(
    max_steps: int,
    lr: float,
    warmup_steps: int,
    seed: int,
    bf16: bool,
    save_every: int,
    grad_accumulation: int,
    parallel: str,
):  # the TrainConfig shared by pretrain and finetune
    from medstate.train import TrainConfig

    return TrainConfig(
        max_steps=max_steps, lr=lr, warmup_steps=min(warmup_steps, max_steps), seed=seed, bf16=bf16,
        save_every=save_every, grad_accumulation=grad_accumulation, parallel=parallel,
    )  # fmt: skip


def _train(kind: str, prepared: Path, run_dir: Path, fit) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(f"{kind}"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(), console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(kind, total=None, loss="-")
        result = fit(lambda step, total, loss: bar.update(task, completed=step, total=total, loss=f"{loss:.4f}"))
    _summary(
        f"{kind}: {run_dir}",
        {
            "steps": result.steps,
            "resumed from step": result.resumed_from if result.resumed_from is not None else "-",
            "last loss": round(result.last_loss, 5),
            "seconds": round(result.seconds, 1),
            "checkpoint": str(run_dir / "checkpoints" / "last"),
        },
    )


MaxSteps = Annotated[int, typer.Option(min=1, help="optimizer steps")]
TokenBudget = Annotated[int, typer.Option(min=16, help="tokens per packed batch")]
GradAccumulation = Annotated[int, typer.Option(min=1, help="batches per optimizer step (on every process)")]
Parallel = Annotated[
    str, typer.Option(help="under torchrun: ddp (a replica per process) or fsdp (weights and optimizer sharded)")
]


@ehr_app.command("pretrain")
def ehr_pretrain(
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
) -> None:
    """Pretrain on the training split: EhrMamba by next-event prediction, the Transformer baselines by MLM."""
    from medstate.ehr.training import pretrain, start_model
    from medstate.train.loop import seed_everything

    seed_everything(seed)
    sizes = {"d_model": d_model, "n_layer": n_layer, "dropout": dropout}
    if model_kind == "ehrmamba":
        sizes["ssm_version"] = ssm_version
    model, _ = start_model(run_dir, prepared, kind=model_kind, sizes=sizes)
    config = _train_options(max_steps, lr, warmup_steps, seed, bf16, save_every, grad_accumulation, parallel)
    _train("pretrain", prepared, run_dir, lambda p: pretrain(prepared, run_dir, model, config, token_budget, p))


@ehr_app.command("finetune")
def ehr_finetune(
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
) -> None:
    """Prompted multitask finetuning (or single-task with --tasks NAME) of an EhrMamba model. With --lora the
    run's checkpoints are adapters (PEFT's format, naming --init); `medstate ehr merge` folds them in."""
    from medstate.ehr.training import finetune, start_model
    from medstate.ssm.lora import LoraSettings
    from medstate.train.loop import seed_everything

    seed_everything(seed)
    targets = parse_list(lora_targets, str, "--lora-targets") if lora_targets else []
    adapters = LoraSettings(targets, lora_rank, lora_alpha, modules_to_save=["classifier"]) if lora else None
    model, _ = start_model(run_dir, prepared, init=init, kind=model_kind, lora=adapters)
    config = _train_options(max_steps, lr, warmup_steps, seed, bf16, save_every, grad_accumulation, parallel)
    names = parse_list(tasks, str, "--tasks") if tasks else None
    _train("finetune", prepared, run_dir, lambda p: finetune(prepared, run_dir, model, config, names, token_budget, p))


@ehr_app.command("merge")
def ehr_merge(
    adapter: Annotated[Path, typer.Argument(help="checkpoint of a `finetune --lora` run (adapters + classifier)")],
    out: Annotated[Path, typer.Argument(help="directory for the merged model")],
) -> None:
    """Fold LoRA adapters into their base model: a plain EHR checkpoint with the base's prepared files."""
    from medstate.ehr.training import merge_adapter

    _summary("merge", {"model": str(merge_adapter(adapter, out))})


@ehr_app.command("evaluate")
def ehr_evaluate(
    prepared: Annotated[Path, typer.Argument(help="output of `medstate ehr prepare`")],
    output: Annotated[Path, typer.Argument(help="run directory for metrics.json, predictions.parquet, report.*")],
    model: Annotated[list[str], typer.Option(help="NAME=CHECKPOINT[@SEED] of a finetuned model (repeatable)")],
    bootstrap: Annotated[int, typer.Option(min=10, help="subject-bootstrap resamples for the 95% intervals")] = 1000,
) -> None:
    """Score the tuning and held-out splits with each model and write the report (AUROC, AUPRC, F1, calibration)."""
    import polars as pl

    from medstate.ehr.training import load_model, predictions_for_report
    from medstate.eval.report import markdown_table, write_report

    frames = []
    for spec in model:
        name, _, rest = spec.partition("=")
        checkpoint, _, seed = rest.partition("@")
        if not name or not checkpoint:
            raise MedstateError(f"--model wants NAME=CHECKPOINT[@SEED], got {spec!r}")
        seed_value = parse_list(seed, int, f"--model {spec}: seed")[0] if seed else 0
        frames.append(predictions_for_report(load_model(Path(checkpoint)), prepared, name, seed_value))
    result = write_report(pl.concat(frames), output, n_bootstrap=bootstrap)
    console.print(markdown_table(result["summary"]))
    console.print(f"report: {output / 'report.html'}")


@ehr_app.command("explain")
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
    from rich.progress import Progress

    from medstate.ehr.training import load_model
    from medstate.interp import explain

    with Progress(console=console, transient=True) as bar:
        progress = bar.add_task("integrated gradients", total=None)
        results = explain(
            prepared, load_model(checkpoint), output, task, subject, split, count, steps, top,
            lambda done, total: bar.update(progress, completed=done, total=total),
        )  # fmt: skip
    table = Table(title=f"{task}: largest attributions")
    for column in ("sample", "p", "label", "top events (attribution)"):
        table.add_column(column)
    for item in results:
        top_events = ", ".join(f"{token} ({score:+.3f})" for token, score in item.top(5))
        table.add_row(item.name, f"{item.attribution.probability:.3f}", str(item.label), top_events)
    console.print(table)
    _summary("explain", {"samples": len(results), "integration steps": steps, "output": str(output)})


@ehr_app.command("forecast")
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
    from rich.progress import Progress

    from medstate.ehr.forecast import ForecastConfig, evaluate_forecast, write_forecast
    from medstate.ehr.training import load_model

    ks = tuple(parse_list(k, int, "--k"))
    config = ForecastConfig(samples, temperature, top_p, max_new_tokens, ks, seed)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("sampling next visits", total=None)
        result = evaluate_forecast(
            load_model(checkpoint), prepared, split, config, lambda d, t: bar.update(task, completed=d, total=t)
        )
    console.print(write_forecast(result, output))
    _summary(
        "forecast",
        {"subjects": result["subjects"], "mean codes in the true next visit": round(result["mean_true_codes"], 1),
         "sampled visits that closed with [VE]": f"{result['complete_visits']:.1%}", "output": str(output)},
    )  # fmt: skip


@ehr_app.command("benchmark")
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
    from rich.progress import BarColumn, Progress, TextColumn

    from medstate.ehr.benchmark import BenchmarkSettings, run_benchmark
    from medstate.eval.report import markdown_table

    chosen = BenchmarkSettings.from_yaml(settings) if settings else BenchmarkSettings()
    if seeds:
        chosen.seeds = parse_list(seeds, int, "--seeds")
    if models:
        names = parse_list(models, str, "--models")
        unknown = set(names) - {m.name for m in chosen.models}
        if unknown:
            raise MedstateError(f"unknown model(s) {', '.join(sorted(unknown))}")
        chosen.models = [m for m in chosen.models if m.name in names]
    with Progress(
        TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("train", total=None, loss="-")
        result = run_benchmark(
            prepared,
            run_dir,
            chosen,
            say=lambda text: bar.console.print(text),
            progress=lambda step, total, loss: bar.update(task, completed=step, total=total, loss=f"{loss:.4f}"),
        )
    console.print(markdown_table(result["summary"]))
    seconds = sum(r["seconds"] for r in result["timings"] if r["stage"] == "total")
    _summary("benchmark", {"models": len(chosen.models), "seeds": len(chosen.seeds), "compute (s)": round(seconds),
                           "report": str(result["report"])})  # fmt: skip


@ehr_app.command("demo")
def ehr_demo(
    data_dir: Annotated[Path, typer.Option(help="the shipped demo data")] = Path("data/demo"),
    out: Annotated[Path, typer.Option(help="run directory (replaced)")] = Path("runs/demo"),
) -> None:
    """The whole EHR path on the shipped demo data: convert, prepare, pretrain, prompted finetune, evaluate."""
    from medstate.ehr.demo import run_demo
    from medstate.eval.report import markdown_table

    result = run_demo(data_dir, out, say=lambda text: console.print(text))
    console.print(markdown_table(result["summary"]))
    _summary("demo", {**{k: f"{v} s" for k, v in result["timings"].items()}, "report": str(result["report"])})


@contextlib.contextmanager
def _text_progress(kind: str, total: int, tokens_per_step: int):
    """A progress bar with loss and tokens per second (row tokens: padding counts where there is any)."""
    import time

    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from medstate.train.distributed import world

    with Progress(
        TextColumn(kind), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TextColumn("{task.fields[rate]} tok/s"), TimeRemainingColumn(), console=console, transient=True,
        disable=not world().main,  # under torchrun, one bar
    ) as bar:  # fmt: skip
        task = bar.add_task(kind, total=total, loss="-", rate="-")
        started, first = time.perf_counter(), []

        def progress(step: int, _total: int, loss: float) -> None:
            first.append(step - 1) if not first else None
            rate = (step - first[0]) * tokens_per_step / (time.perf_counter() - started)
            bar.update(task, completed=step, loss=f"{loss:.4f}", rate=f"{rate:,.0f}")

        yield progress


@text_app.command("tokenizer")
def text_tokenizer(
    corpora: Annotated[Path, typer.Argument(help="YAML with a `corpora:` list (name, path, text_fields, ...)")],
    out: Annotated[Path, typer.Argument(help="directory for tokenizer.json + tokenizer_config.json")],
    vocab_size: Annotated[int, typer.Option(min=257, help="ids, including the 256 bytes and <|endoftext|>")] = 8192,
) -> None:
    """Train a byte-level BPE on the listed corpora (every byte string encodes and decodes back exactly)."""
    from medstate.text.corpora import read_corpus_list, read_documents
    from medstate.text.tokenizer import train_bpe

    sources = read_corpus_list(corpora)
    tokenizer = train_bpe((d.text for s in sources for d in read_documents(s)), vocab_size)
    tokenizer.save(out)
    _summary("tokenizer", {"ids": len(tokenizer), "end of text": tokenizer.eos_id, "saved": str(out)})


def _overridden(settings, max_steps: int | None, seed: int | None, init: Path | None):
    """A text recipe's settings with the command line's --max-steps, --seed and --init put in, checked again."""
    import dataclasses

    from medstate.loading import from_data

    overrides = {k: v for k, v in {"max_steps": max_steps, "seed": seed}.items() if v is not None}
    if overrides:
        train = from_data(type(settings.train), {**dataclasses.asdict(settings.train), **overrides}, "options")
        settings = dataclasses.replace(settings, train=train)
    if init is not None:
        settings = dataclasses.replace(settings, init=str(init.resolve()))
    return settings


@text_app.command("pretrain")
def text_pretrain(
    config: Annotated[Path, typer.Argument(help="pretraining YAML (tokenizer, weighted corpora, validation, train)")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (resumes from its checkpoint if there is one)")],
    max_steps: Annotated[int | None, typer.Option(min=1, help="override train.max_steps")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    init: Annotated[Path | None, typer.Option(help="override init: the checkpoint to continue from")] = None,
) -> None:
    """Continued pretraining (or from scratch) on a weighted mix of corpora, held-out text kept out."""
    from medstate.text.biomed.pretrain import PretrainConfig, pretrain
    from medstate.train.distributed import world

    settings = _overridden(PretrainConfig.read(config), max_steps, seed, init)
    tokens_per_step = settings.seq_len * settings.batch_size * settings.train.grad_accumulation
    with _text_progress("pretrain", settings.train.max_steps, tokens_per_step) as progress:
        result = pretrain(settings, run_dir, progress)
    if not world().main:  # under torchrun, the first process reports
        return
    rows = {"steps": result.steps, "model": str(result.model_dir)}
    for name, share in result.metrics["realised_shares"].items():
        rows[f"share {name}"] = f"{share:.3f} (asked {result.metrics['requested_shares'][name]:.3f})"
    for name, scores in result.metrics["validation"].items():
        bpb = scores["bits_per_byte"]
        rows[f"{name} bits/byte"] = f"{bpb['value']:.4f} [{bpb['low']:.4f}, {bpb['high']:.4f}]"
    _summary(f"pretrain: {run_dir}", rows)


def _interval(result: dict, scale: float = 1.0, digits: int = 4) -> str:
    value, low, high = (result[k] * scale for k in ("value", "low", "high"))
    return f"{value:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


@text_app.command("eval")
def text_eval(
    model_dir: Annotated[Path, typer.Argument(help="model directory (with its tokenizer, as pretrain writes it)")],
    corpora: Annotated[Path | None, typer.Option(help="YAML with a `corpora:` list of held-out text")] = None,
    pubmedqa: Annotated[
        Path | None, typer.Option(help="PubMedQA folder: score its official 500-item test split")
    ] = None,
    tokenizer: Annotated[Path | None, typer.Option(help="tokenizer directory (default: the model's)")] = None,
    length: Annotated[int, typer.Option(min=2, help="tokens per row; longer documents go in segments")] = 2048,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    out: Annotated[Path | None, typer.Option(help="write the figures as JSON here")] = None,
) -> None:
    """Perplexity and bits per byte per corpus (token-weighted, 95% intervals over documents) and PubMedQA accuracy
    and macro-F1 on the official test split, with the majority baseline."""
    from medstate.text.biomed.pubmedqa import load_pubmedqa, majority_label, score_pubmedqa
    from medstate.text.corpora import read_corpus_list, read_documents
    from medstate.text.evaluate import evaluate_corpora
    from medstate.text.models import load_language_model
    from medstate.text.tokenizer import TextTokenizer

    if corpora is None and pubmedqa is None:
        raise MedstateError("give --corpora FILE and/or --pubmedqa FOLDER")
    model, encoder = load_language_model(model_dir), TextTokenizer.load(tokenizer or model_dir)
    figures: dict = {}
    if corpora is not None:
        documents = {s.name: list(read_documents(s)) for s in read_corpus_list(corpora)}
        figures["perplexity"] = evaluate_corpora(model, encoder, documents, length, batch_size)
        table = Table(title=f"{model_dir}: held-out text")
        for column in ("corpus", "documents", "tokens", "perplexity", "bits per byte"):
            table.add_column(column)
        for name, row in figures["perplexity"].items():
            cells = [_interval(row[m]) for m in ("perplexity", "bits_per_byte")]
            table.add_row(name, str(row["documents"]), f"{row['tokens']:,}", *cells)
        console.print(table)
    if pubmedqa is not None:
        pool, test = load_pubmedqa(pubmedqa)
        figures["pubmedqa"] = score_pubmedqa(model, encoder, test, majority_label(pool), batch_size).to_dict()
        console.print(_pubmedqa_table(figures["pubmedqa"], f"{model_dir}: PubMedQA test ({len(test)} items)"))
    if out is not None:
        out.write_text(json.dumps(figures, indent=1) + "\n")


def _pubmedqa_table(result: dict, title: str) -> Table:
    table = Table(title=title)
    for column in ("", "accuracy %", "macro-F1 %", "yes/no accuracy %"):
        table.add_column(column)
    for name, row in (
        ("model", result["model"]),
        (f"always {result['majority_baseline']['label']}", result["majority_baseline"]),
    ):
        table.add_row(name, *(_interval(row[m], 100, 1) for m in ("accuracy", "macro_f1", "yes_no_accuracy")))
    return table


@text_app.command("notes")
def text_notes(
    source: Annotated[Path, typer.Argument(help="MEDS folder, MIMIC-III NOTEEVENTS, MIMIC-IV-Note CSV or n2c2 folder")],
    out: Annotated[Path, typer.Argument(help="documents JSONL; with --cohort, a folder for dataset + criteria")],
    source_format: Annotated[str, typer.Option("--format", help="auto, meds, mimic3, mimic4 or n2c2")] = "auto",
    by: Annotated[str, typer.Option(help="one document per subject or per admission")] = "subject",
    until: Annotated[str | None, typer.Option(help="only notes written at or before this time (ISO 8601)")] = None,
    keep_deid: Annotated[bool, typer.Option(help="keep MIMIC-III de-identification brackets [** … **]")] = False,
    cohort: Annotated[Path | None, typer.Option(help="cohort YAML: label criteria from structured MEDS data")] = None,
    n2c2_test: Annotated[
        Path | None, typer.Option(help="n2c2 2018 test folder: SOURCE is its train folder; write a labelled cohort")
    ] = None,
    split: Annotated[
        bool, typer.Option(help="give each document its patient's split (train 60%, tuning 20%, test 20%, seeded)")
    ] = False,
) -> None:
    """A patient's notes as documents in time order (a header per note), or a labelled cohort for `text classify`."""
    import datetime as dt
    import warnings

    from medstate.text.notes.documents import build_documents, read_notes, unusable_notes, write_documents
    from medstate.text.notes.splits import DEFAULT_SPLITS

    if n2c2_test is not None:
        from medstate.text.notes.cohort import write_n2c2_cohort

        folder = write_n2c2_cohort(source, n2c2_test, out)
        _summary(
            f"cohort: {folder}", {"dataset": str(folder / "dataset.jsonl"), "criteria": str(folder / "criteria.yaml")}
        )
        return
    if cohort is not None:
        from medstate.text.notes.cohort import CohortConfig, write_cohort

        settings = CohortConfig.read(cohort)
        if source.resolve() != Path(settings.meds).resolve():
            raise MedstateError(f"{cohort} reads {settings.meds}, not {source}")
        folder = write_cohort(settings, out)
        _summary(
            f"cohort: {folder}", {"dataset": str(folder / "dataset.jsonl"), "criteria": str(folder / "criteria.yaml")}
        )
        return
    try:
        cut = dt.datetime.fromisoformat(until) if until else None
    except ValueError:
        raise MedstateError(f"--until wants an ISO 8601 time, got {until!r}") from None
    notes = read_notes(source, source_format)
    with warnings.catch_warnings():  # the summary counts what was left out
        warnings.simplefilter("ignore")
        documents = build_documents(notes, by, cut, clean_deid=not keep_deid)
    path = write_documents(documents, out, DEFAULT_SPLITS if split else None)
    left_out = {f"notes left out {why}": n for why, n in unusable_notes(notes).items() if n}
    _summary(f"notes: {path}", {"documents": len(documents), "notes": sum(d.notes for d in documents), **left_out})


@text_app.command("coding")
def text_coding(
    folder: Annotated[Path, typer.Argument(help="the NCBI disease corpus (its train / develop / test PubTator files)")],
    out: Annotated[Path, typer.Argument(help="folder for dataset.jsonl and criteria.yaml")],
    top: Annotated[int, typer.Option(min=1, help="the most frequent training concepts to code")] = 20,
) -> None:
    """ICD-coding-style labels on the NCBI disease corpus's official split, for `text classify`."""
    from medstate.text.notes.coding import write_ncbi_disease

    folder = write_ncbi_disease(folder, out, top)
    _summary(f"coding: {folder}", {"dataset": str(folder / "dataset.jsonl"), "criteria": str(folder / "criteria.yaml")})


@text_app.command("classify")
def text_classify(
    config: Annotated[Path, typer.Argument(help="classify YAML (init model, criteria, data, train)")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (resumes from its checkpoint if there is one)")],
    max_steps: Annotated[int | None, typer.Option(min=1, help="override train.max_steps")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    init: Annotated[Path | None, typer.Option(help="override init: the model to finetune")] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="tfidf or pooled (the model's mean hidden state): logistic regression, same splits, metrics"),
    ] = None,
) -> None:
    """Prompt-based multi-label classification: answer-slot finetuning with state branching, thresholds and checkpoint
    from the tuning split, the test split scored once (metrics.json, predictions.parquet, report.md)."""
    from medstate.text.notes.classify_run import ClassifyConfig, run_baseline, run_classification
    from medstate.train.distributed import world

    settings = _overridden(ClassifyConfig.read(config), max_steps, seed, init)
    if baseline is not None:
        metrics = run_baseline(settings, run_dir, baseline)
    else:
        with _text_progress("classify", settings.train.max_steps, 0) as progress:
            metrics = run_classification(settings, run_dir, progress)
    if not world().main:
        return
    shown = {k: metrics[k] for k in ("model", "documents", "best_tuning_loss") if k in metrics}
    _summary(f"classify: {run_dir}", shown)
    for kind in ("per_label", "global"):
        values = metrics[f"test_{kind}_thresholds"]
        shown = {k: _interval(v, 1, 3) if v["low"] is not None else v["status"] for k, v in values.items()}
        _summary(f"test split, {kind.replace('_', '-')} thresholds", shown)


@text_app.command("sft")
def text_sft(
    config: Annotated[Path, typer.Argument(help="SFT YAML (init model, tasks, train)")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (resumes from its checkpoint if there is one)")],
    max_steps: Annotated[int | None, typer.Option(min=1, help="override train.max_steps")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    init: Annotated[Path | None, typer.Option(help="override init: the model to finetune")] = None,
    lora: Annotated[
        bool, typer.Option(help="train LoRA adapters only (the YAML's `lora:` settings, else rank 16, alpha 32)")
    ] = False,
) -> None:
    """Supervised finetuning with the loss on response tokens only; PubMedQA scored before and after if asked.
    With LoRA, run_dir/adapter holds the adapters (PEFT's format) and run_dir/model the merged model."""
    import dataclasses

    from medstate.ssm.lora import LoraSettings
    from medstate.text.biomed.sft import SFTConfig, finetune
    from medstate.train.distributed import world

    settings = _overridden(SFTConfig.read(config), max_steps, seed, init)
    if lora and settings.lora is None:
        settings = dataclasses.replace(settings, lora=LoraSettings())
    tokens_per_step = settings.seq_len * settings.batch_size * settings.train.grad_accumulation
    with _text_progress("sft", settings.train.max_steps, tokens_per_step) as progress:
        result = finetune(settings, run_dir, progress)
    if not world().main:  # under torchrun, the first process reports
        return
    _summary(
        f"sft: {run_dir}",
        {k: v for k, v in result.metrics.items() if not k.startswith("pubmedqa") and k != "generation_rouge"},
    )
    for key in ("pubmedqa_zero_shot", "pubmedqa_finetuned"):
        if key in result.metrics:
            console.print(_pubmedqa_table(result.metrics[key], f"PubMedQA test, {key.removeprefix('pubmedqa_')}"))
    if "pubmedqa_generation_rouge" in result.metrics:
        scores = result.metrics["pubmedqa_generation_rouge"]
        _summary("PubMedQA answers generated (ROUGE F ×100)", {k: _interval(v, 1, 2) for k, v in scores.items()})
    for name, scores in result.metrics.get("generation_rouge", {}).items():
        _summary(f"{name}: generated (ROUGE F ×100)", {k: _interval(v, 1, 2) for k, v in scores.items()})


@text_app.command("prune")
def text_prune(
    model_dir: Annotated[Path, typer.Argument(help="model directory (with its tokenizer)")],
    out: Annotated[Path, typer.Argument(help="directory for the pruned model")],
    keep: Annotated[
        str | None, typer.Option(help="blocks to keep: 0,1,2,4 or first:K, last:K, every-other, drop:3,5")
    ] = None,
    drop: Annotated[
        int | None, typer.Option(min=0, help="drop this many blocks of least influence on the calibration text")
    ] = None,
    calibration: Annotated[Path | None, typer.Option(help="YAML with a `corpora:` list of calibration text")] = None,
    tokens: Annotated[int, typer.Option(min=2, help="calibration tokens")] = 16_384,
    length: Annotated[int, typer.Option(min=2, help="tokens per calibration row")] = 1024,
) -> None:
    """Remove whole blocks: an ordinary checkpoint (HF transformers loads it), with prune.json."""
    from medstate.text.corpora import read_corpus_list
    from medstate.text.summarise.pruning import prune_checkpoint

    sources = read_corpus_list(calibration) if calibration is not None else None
    report = prune_checkpoint(model_dir, out, keep, drop, sources, tokens, length)
    shown = {k: report[k] for k in ("layers_before", "layers_after", "kept", "dropped", "parameters_after")}
    _summary(f"prune: {out}", {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in shown.items()})


@text_app.command("merge")
def text_merge(
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter directory (PEFT's format, naming its base model)")],
    out: Annotated[Path, typer.Argument(help="directory for the merged model")],
) -> None:
    """Fold LoRA adapters into their base model: a plain checkpoint in the Hugging Face layout."""
    from medstate.text.models import merge_adapter

    _summary("merge", {"model": str(merge_adapter(adapter, out))})


@text_app.command("generate")
def text_generate(
    model_dir: Annotated[Path, typer.Argument(help="model directory (with its tokenizer)")],
    prompt: Annotated[list[str] | None, typer.Option(help="a prompt (repeat for several)")] = None,
    records: Annotated[Path | None, typer.Option(help="JSON Lines / JSON / CSV / Parquet of prompts")] = None,
    template: Annotated[str, typer.Option(help="prompt template over a record's fields")] = "{prompt}",
    reference: Annotated[str | None, typer.Option(help="reference template: score the outputs with ROUGE")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0)] = 1.0,
    num_beams: Annotated[int, typer.Option(min=1, help="beam search with this many beams (1: greedy/sampled)")] = 1,
    length_penalty: Annotated[float, typer.Option(help="beam search: score / length ** this")] = 1.0,
    stop: Annotated[list[str] | None, typer.Option(help="stop string (repeat for several)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    limit: Annotated[int | None, typer.Option(min=1, help="first N records only")] = None,
    seed: int = 0,
    out: Annotated[Path | None, typer.Option(help="write prompts, outputs (and ROUGE) as JSON here")] = None,
) -> None:
    """Generate continuations (greedy or sampled) through O(1) recurrent steps; with --reference, ROUGE-1/2/L/Lsum
    with 95% intervals."""
    from medstate.ssm import load_pretrained
    from medstate.text.generate import generate_for_records
    from medstate.text.tokenizer import TextTokenizer

    if bool(prompt) == (records is not None):
        raise MedstateError("give either --prompt TEXT (one or more) or --records FILE")
    model, encoder = load_pretrained(model_dir), TextTokenizer.load(model_dir)
    result = generate_for_records(
        model, encoder, prompts=prompt, records=records, template=template, reference=reference, limit=limit,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop or (),
        batch_size=batch_size, seed=seed, num_beams=num_beams, length_penalty=length_penalty,
    )  # fmt: skip
    if records is None:
        for text in result["outputs"]:
            console.print(text, markup=False, highlight=False)
    if "rouge" in result:
        _summary("ROUGE (F, ×100, 95% interval)", {k: _interval(v, 1, 2) for k, v in result["rouge"].items()})
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")


@contextlib.contextmanager
def _step_progress(kind: str):
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(
        TextColumn(kind), BarColumn(), TextColumn("{task.completed}/{task.total} loss {task.fields[loss]}"),
        TimeRemainingColumn(), console=console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(kind, total=None, loss="-")
        yield lambda step, total, loss: bar.update(task, completed=step, total=total, loss=f"{loss:.4f}")


def _vision_summary(title: str, metrics: dict, where: Path) -> None:
    test = metrics["test"]
    rows = {"model": metrics["model"], "backend": f"{metrics['backend']} ({metrics['device']})"}
    if metrics["task"] != "segmentation":
        for name in ("auc", "accuracy"):
            rows[name] = "undefined" if test[name]["value"] is None else _interval(test[name], 1, 3)
    else:
        rows.update({k: "undefined" if v is None else round(v, 4) for k, v in test["summary"].items()})
    rows["report"] = str(where / "report.md")
    _summary(title, rows)


@vision_app.command("train")
def vision_train(
    config: Annotated[Path, typer.Argument(help="run YAML: data, model (kind: vision-mamba, umamba, ...), train")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (config, model/, metrics.json, report.md)")],
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="override train.epochs (classification)")] = None,
    steps: Annotated[int | None, typer.Option(min=1, help="override train.steps (segmentation)")] = None,
    require_kernels: Annotated[
        bool, typer.Option(help="refuse to run unless the fused CUDA kernels (mamba-ssm) are in use")
    ] = False,
) -> None:
    """Train a classifier, a segmenter or a bag classifier (MambaMIL); test the selected model; write the run."""
    from medstate.vision.run import fit, load_run_config

    overrides = {k: v for k, v in {"seed": seed, "epochs": epochs, "steps": steps}.items() if v is not None}
    settings = load_run_config(config, overrides)
    with _step_progress("train") as progress:
        metrics = fit(settings, run_dir, progress, require_fused=require_kernels)
    _vision_summary("vision train", metrics, run_dir)


@vision_app.command("evaluate")
def vision_evaluate(
    model_dir: Annotated[Path, typer.Argument(help="a vision model directory (a run's model/)")],
    config: Annotated[Path, typer.Argument(help="run YAML naming the data (its train settings set the inference)")],
    out: Annotated[Path, typer.Argument(help="folder for metrics.json, predictions and report.md")],
    split: Annotated[str, typer.Option(help="train, val or test")] = "test",
) -> None:
    """Score a saved model on a split of a dataset."""
    from medstate.vision.run import evaluate_saved, load_run_config

    metrics = evaluate_saved(model_dir, load_run_config(config), split, out)
    _vision_summary(f"vision evaluate ({split})", metrics, out)


@vision_app.command("predict")
def vision_predict(
    model_dir: Annotated[Path, typer.Argument(help="a vision model directory (a run's model/)")],
    images: Annotated[list[Path], typer.Argument(help="image or volume files (PNG, TIFF, NIfTI, NPY); bags (NPY, PT)")],
    out: Annotated[Path, typer.Option(help="output folder")] = Path("predictions"),
) -> None:
    """Predict new images or bags: class probabilities (predictions.csv) or one mask file per image."""
    from medstate.vision.run import predict_files

    written = predict_files(model_dir, images, out)
    _summary("vision predict", {"images": len(images), "written": str(written)})


@vision_app.command("prepare")
def vision_prepare(
    dataset: Annotated[str, typer.Argument(help="nuclei (StarDist 2D) or brain (ITK T1 with k-means tissues)")],
    source: Annotated[Path, typer.Argument(help="the folder holding the shared files")],
    out: Annotated[Path, typer.Argument(help="dataset folder to write (train/, test/)")],
) -> None:
    """Write a shared example in the folder layout `vision train` reads."""
    from medstate.vision.data import PREPARERS

    if dataset not in PREPARERS:
        raise MedstateError(f"unknown dataset {dataset!r}; choose nuclei or brain")
    _summary("vision prepare", {"dataset": dataset, "written": str(PREPARERS[dataset][0](source, out))})


Database = Annotated[str, typer.Option(help="SQLite file (created if absent) or postgresql://user@host/db URL")]
serve_token_app = typer.Typer(help="API tokens of `medstate serve`: create, revoke, list.", no_args_is_help=True)
app.add_typer(serve_token_app, name="serve-token")


@app.command("serve")
def serve(
    model_dir: Annotated[Path, typer.Argument(help="finetuned EhrMamba checkpoint (with its vocab, bins, tasks)")],
    db: Database,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8000,
    max_concurrent: Annotated[int, typer.Option(min=1, help="requests served at once (more: 503)")] = 32,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="largest request body (more: 413)")] = 4.0,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (with --ssl-certfile: HTTPS)")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain")] = None,
    reencode: Annotated[
        bool, typer.Option(help="keep no state: re-encode each patient's whole history at every ingest (comparison)")
    ] = False,
) -> None:
    """Serve per-patient predictions, updated event by event (docs at /docs; tokens: `medstate serve-token`)."""
    import logging

    import uvicorn

    from medstate.serve.app import Limits, create_app
    from medstate.serve.service import open_service

    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise MedstateError("TLS needs both --ssl-keyfile and --ssl-certfile")
    service = open_service(model_dir, db, reencode=reencode)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    limits = Limits(max_body_bytes=int(max_body_mb * 1024 * 1024), max_concurrent=max_concurrent)
    uvicorn.run(create_app(service, limits), host=host, port=port, access_log=False, log_level="info",
                ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)  # fmt: skip


@app.command("serve-rebuild")
def serve_rebuild(
    model_dir: Annotated[Path, typer.Argument(help="the new model's checkpoint")],
    db: Database,
) -> None:
    """Re-encode every patient's state from the event log with MODEL_DIR (after a model change)."""
    from rich.progress import Progress

    from medstate.serve.service import open_service

    service = open_service(model_dir, db)
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("patients", total=None)
        done = service.rebuild(lambda n, total: bar.update(task, completed=n, total=total))
    _summary("rebuild", {"patients": done, "model_version": service.version})


@serve_token_app.command("create")
def serve_token_create(
    name: Annotated[str, typer.Argument(help="who holds it (shown in the audit log)")],
    db: Database,
    scopes: Annotated[str, typer.Option(help="comma-separated: ingest, read, admin")] = "read",
) -> None:
    """Create a token; it is printed once (only its SHA-256 digest is stored)."""
    from medstate.serve.store import open_store

    token = open_store(db).create_token(name, parse_list(scopes, str, "--scopes"))
    console.print(token, markup=False, highlight=False)


@serve_token_app.command("revoke")
def serve_token_revoke(name: Annotated[str, typer.Argument()], db: Database) -> None:
    """Revoke a token: requests with it get 401 from then on."""
    from medstate.serve.store import open_store

    open_store(db).revoke_token(name)
    _summary("revoked", {"token": name})


@serve_token_app.command("list")
def serve_token_list(db: Database) -> None:
    """Tokens: name, scopes, created, revoked."""
    from medstate.serve.store import open_store

    table = Table(title="tokens")
    for column in ("name", "scopes", "created_at", "revoked_at"):
        table.add_column(column)
    for row in open_store(db).list_tokens():
        table.add_row(*(str(row[c] or "") for c in ("name", "scopes", "created_at", "revoked_at")))
    console.print(table)


if __name__ == "__main__":
    app()
