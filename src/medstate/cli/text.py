"""`medstate text`: language models over medical text — the core (tokenizer, generation, merging) and the
BioMamba, ClinicalMamba and summarisation recipes (`medstate.text`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from medstate.cli.common import console, summary, table, token_steps
from medstate.errors import MedstateError
from medstate.eval.metrics import format_interval
from medstate.ssm import load_pretrained
from medstate.ssm.lora import LoraSettings
from medstate.text.biomed.evaluate import evaluate_model
from medstate.text.biomed.pretrain import PretrainConfig, pretrain
from medstate.text.biomed.sft import SFTConfig, finetune
from medstate.text.corpora import read_corpus_list, read_documents
from medstate.text.generate import generate_for_records
from medstate.text.models import merge_adapter
from medstate.text.notes.classify_run import ClassifyConfig, run_baseline, run_classification
from medstate.text.notes.coding import write_ncbi_disease
from medstate.text.notes.export import export_notes
from medstate.text.summarise.pruning import prune_checkpoint
from medstate.text.tokenizer import TextTokenizer, train_bpe
from medstate.train.distributed import world

app = typer.Typer(no_args_is_help=True, add_completion=False)


def _overrides(max_steps: int | None, seed: int | None, init: Path | None) -> dict:
    """A recipe's --max-steps, --seed and --init, as `load_settings` overrides."""
    return {"train.max_steps": max_steps, "train.seed": seed, "init": init}


def _cohort_summary(folder: Path, kind: str = "cohort") -> None:
    summary(f"{kind}: {folder}", {"dataset": str(folder / "dataset.jsonl"), "criteria": str(folder / "criteria.yaml")})


def _pubmedqa_table(result: dict, title: str) -> None:
    rows = [
        [name, *(format_interval(row[m], 100, 1) for m in ("accuracy", "macro_f1", "yes_no_accuracy"))]
        for name, row in (
            ("model", result["model"]),
            (f"always {result['majority_baseline']['label']}", result["majority_baseline"]),
        )
    ]
    table(title, ["", "accuracy %", "macro-F1 %", "yes/no accuracy %"], rows, left=4)


def _rouge(title: str, scores: dict) -> None:
    summary(title, {k: format_interval(v, 1, 2) for k, v in scores.items()})


@app.command("tokenizer")
def text_tokenizer(
    corpora: Annotated[Path, typer.Argument(help="YAML with a `corpora:` list (name, path, text_fields, ...)")],
    out: Annotated[Path, typer.Argument(help="directory for tokenizer.json + tokenizer_config.json")],
    vocab_size: Annotated[int, typer.Option(min=257, help="ids, including the 256 bytes and <|endoftext|>")] = 8192,
) -> None:
    """Train a byte-level BPE on the listed corpora (every byte string encodes and decodes back exactly)."""

    sources = read_corpus_list(corpora)
    tokenizer = train_bpe((d.text for s in sources for d in read_documents(s)), vocab_size)
    tokenizer.save(out)
    summary("tokenizer", {"ids": len(tokenizer), "end of text": tokenizer.eos_id, "saved": str(out)})


@app.command("pretrain")
def text_pretrain(
    config: Annotated[Path, typer.Argument(help="pretraining YAML (tokenizer, weighted corpora, validation, train)")],
    run_dir: Annotated[Path, typer.Argument(help="run directory (resumes from its checkpoint if there is one)")],
    max_steps: Annotated[int | None, typer.Option(min=1, help="override train.max_steps")] = None,
    seed: Annotated[int | None, typer.Option(help="override train.seed")] = None,
    init: Annotated[Path | None, typer.Option(help="override init: the checkpoint to continue from")] = None,
) -> None:
    """Continued pretraining (or from scratch) on a weighted mix of corpora, held-out text kept out."""

    settings = PretrainConfig.read(config, _overrides(max_steps, seed, init))
    tokens_per_step = settings.seq_len * settings.batch_size * settings.train.grad_accumulation
    with token_steps("pretrain", settings.train.max_steps, tokens_per_step, world().main) as progress:
        result = pretrain(settings, run_dir, progress)
    if not world().main:  # under torchrun, the first process reports
        return
    rows = {"steps": result.steps, "model": str(result.model_dir)}
    for name, share in result.metrics["realised_shares"].items():
        rows[f"share {name}"] = f"{share:.3f} (asked {result.metrics['requested_shares'][name]:.3f})"
    for name, scores in result.metrics["validation"].items():
        rows[f"{name} bits/byte"] = format_interval(scores["bits_per_byte"], digits=4)
    summary(f"pretrain: {run_dir}", rows)


@app.command("eval")
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

    figures = evaluate_model(model_dir, corpora, pubmedqa, tokenizer, length, batch_size)
    if "perplexity" in figures:
        rows = [
            [name, str(row["documents"]), f"{row['tokens']:,}",
             *(format_interval(row[m], digits=4) for m in ("perplexity", "bits_per_byte"))]
            for name, row in figures["perplexity"].items()
        ]  # fmt: skip
        table(f"{model_dir}: held-out text", ["corpus", "documents", "tokens", "perplexity", "bits per byte"], rows, 5)
    if "pubmedqa" in figures:
        scores = figures["pubmedqa"]
        _pubmedqa_table(scores, f"{model_dir}: PubMedQA test ({scores['items']} items)")
    if out is not None:
        out.write_text(json.dumps(figures, indent=1) + "\n")


@app.command("notes")
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

    done = export_notes(source, out, source_format, by, until, keep_deid, cohort, n2c2_test, split)
    if done.kind == "cohort":
        _cohort_summary(done.path)
    else:
        summary(f"notes: {done.path}", done.counts)


@app.command("coding")
def text_coding(
    folder: Annotated[Path, typer.Argument(help="the NCBI disease corpus (its train / develop / test PubTator files)")],
    out: Annotated[Path, typer.Argument(help="folder for dataset.jsonl and criteria.yaml")],
    top: Annotated[int, typer.Option(min=1, help="the most frequent training concepts to code")] = 20,
) -> None:
    """ICD-coding-style labels on the NCBI disease corpus's official split, for `text classify`."""

    _cohort_summary(write_ncbi_disease(folder, out, top), "coding")


@app.command("classify")
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

    settings = ClassifyConfig.read(config, _overrides(max_steps, seed, init))
    if baseline is not None:
        metrics = run_baseline(settings, run_dir, baseline)
    else:
        with token_steps("classify", settings.train.max_steps, 0, world().main) as progress:
            metrics = run_classification(settings, run_dir, progress)
    if not world().main:
        return
    summary(f"classify: {run_dir}", {k: metrics[k] for k in ("model", "documents", "best_tuning_loss") if k in metrics})
    for kind in ("per_label", "global"):
        values = metrics[f"test_{kind}_thresholds"]
        summary(f"test split, {kind.replace('_', '-')} thresholds", {k: format_interval(v) for k, v in values.items()})


@app.command("sft")
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

    settings = SFTConfig.read(config, _overrides(max_steps, seed, init))
    if lora and settings.lora is None:
        settings.lora = LoraSettings()
    tokens_per_step = settings.seq_len * settings.batch_size * settings.train.grad_accumulation
    with token_steps("sft", settings.train.max_steps, tokens_per_step, world().main) as progress:
        result = finetune(settings, run_dir, progress)
    if not world().main:  # under torchrun, the first process reports
        return
    summary(
        f"sft: {run_dir}",
        {k: v for k, v in result.metrics.items() if not k.startswith("pubmedqa") and k != "generation_rouge"},
    )
    for key in ("pubmedqa_zero_shot", "pubmedqa_finetuned"):
        if key in result.metrics:
            _pubmedqa_table(result.metrics[key], f"PubMedQA test, {key.removeprefix('pubmedqa_')}")
    if "pubmedqa_generation_rouge" in result.metrics:
        _rouge("PubMedQA answers generated (ROUGE F ×100)", result.metrics["pubmedqa_generation_rouge"])
    for name, scores in result.metrics.get("generation_rouge", {}).items():
        _rouge(f"{name}: generated (ROUGE F ×100)", scores)


@app.command("prune")
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

    sources = read_corpus_list(calibration) if calibration is not None else None
    report = prune_checkpoint(model_dir, out, keep, drop, sources, tokens, length)
    shown = {k: report[k] for k in ("layers_before", "layers_after", "kept", "dropped", "parameters_after")}
    summary(f"prune: {out}", {k: ", ".join(map(str, v)) if isinstance(v, list) else v for k, v in shown.items()})


@app.command("merge")
def text_merge(
    adapter: Annotated[Path, typer.Argument(help="LoRA adapter directory (PEFT's format, naming its base model)")],
    out: Annotated[Path, typer.Argument(help="directory for the merged model")],
) -> None:
    """Fold LoRA adapters into their base model: a plain checkpoint in the Hugging Face layout."""

    summary("merge", {"model": str(merge_adapter(adapter, out))})


@app.command("generate")
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
        _rouge("ROUGE (F, ×100, 95% interval)", result["rouge"])
    if out is not None:
        out.write_text(json.dumps(result, indent=1) + "\n")
