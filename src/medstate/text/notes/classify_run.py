"""`medstate text classify`: train and evaluate prompt-based multi-label classification on a labelled dataset.

Inputs, both plain data:

    criteria YAML     criteria: [{name, question}, …]
    dataset JSONL     one document per line: {"id", "subject", "split": train|tuning|test, "text",
                      "labels": {criterion name: true|false, …}}   (`medstate text notes` writes it)

The model (a local checkpoint with its tokenizer) is finetuned on the train split with the answer-slot loss
(`text.classify.slot_loss`, one document and all its criteria per micro-batch, state branching), the tuning split's
slot loss picks the checkpoint (EMA weights when there is an EMA) and its scores pick the thresholds (one per label,
and one global), and the test split is scored once, with that model and those thresholds. The run directory holds
metrics.json (micro/macro P/R/F1 with both threshold kinds, P/R/F1@k, micro/macro AUROC, each with a 95% interval
over subjects), predictions.parquet (one row per document and criterion) and report.md.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch

from medstate.errors import MedstateError
from medstate.eval.metrics import format_interval
from medstate.eval.multilabel import multilabel_metrics
from medstate.loading import PATH, from_data, load_settings, read_yaml
from medstate.ssm import load_pretrained
from medstate.text.models import load_language_model
from medstate.text.notes.classify import Criterion, answer_ids, criterion_scores, slot_loss, tune_thresholds
from medstate.text.notes.splits import SPLITS, LabelledDocument
from medstate.text.runs import export_model, open_run
from medstate.text.tokenizer import TextTokenizer
from medstate.train.loop import TrainConfig, Trainer


@dataclass
class CriteriaFile:
    criteria: list[Criterion]


def read_criteria(path: str | Path) -> list[Criterion]:
    criteria = from_data(CriteriaFile, read_yaml(path, "criteria"), str(path)).criteria
    names = [c.name for c in criteria]
    if not criteria or len(set(names)) != len(names):
        raise MedstateError(f"{path}: criteria must be a non-empty list with distinct names")
    return criteria


def read_labelled(path: str | Path, criteria: list[Criterion]) -> list[LabelledDocument]:
    """The dataset JSONL; every document must label every criterion and name a known split."""
    path = Path(path)
    if not path.is_file():
        raise MedstateError(f"{path} not found")
    names = {c.name for c in criteria}
    documents = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise MedstateError(f"{where}: not JSON ({err.msg})") from None
            missing = [k for k in ("id", "subject", "split", "text", "labels") if k not in record]
            if missing:
                raise MedstateError(f"{where}: no field(s) {', '.join(missing)}")
            if record["split"] not in SPLITS:
                raise MedstateError(f"{where}: split {record['split']!r} is not one of {', '.join(SPLITS)}")
            labels = record["labels"]
            if (
                not isinstance(labels, dict)
                or set(labels) != names
                or not all(isinstance(v, bool) for v in labels.values())
            ):
                raise MedstateError(f"{where}: labels must give true/false for exactly the criteria {sorted(names)}")
            documents.append(LabelledDocument(str(record["id"]), str(record["subject"]), record["split"],
                                              str(record["text"]), labels))  # fmt: skip
    for split in SPLITS:
        if not any(d.split == split for d in documents):
            raise MedstateError(f"{path}: no documents in the {split} split")
    leaked = {d.subject for d in documents if d.split == "test"} & {d.subject for d in documents if d.split != "test"}
    if leaked:
        raise MedstateError(f"{path}: subjects in the test split and another split: {sorted(leaked)[:5]}")
    return documents


@dataclass
class ClassifyConfig:
    init: str = field(metadata=PATH)  # the model directory (with its tokenizer)
    criteria: str = field(metadata=PATH)  # criteria YAML
    data: str = field(metadata=PATH)  # dataset JSONL
    max_document_tokens: int = 16384
    k: list[int] = field(default_factory=lambda: [1, 3])
    bootstrap: int = 1000
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100, lr=1e-4, warmup_steps=10))

    @classmethod
    def read(cls, path: str | Path, overrides: dict | None = None) -> ClassifyConfig:
        """A YAML file (relative paths in it are relative to its folder) with typed overrides (`load_settings`)."""
        return load_settings(cls, path, overrides, "classify config")


def _matrix(documents: list[LabelledDocument], criteria: list[Criterion]) -> np.ndarray:
    return np.array([[d.labels[c.name] for c in criteria] for d in documents], dtype=bool)


def run_classification(
    config: ClassifyConfig, run_dir: str | Path, progress: Callable[[int, int, float], None] | None = None
) -> dict:
    run_dir, here = open_run(config, run_dir)
    criteria = read_criteria(config.criteria)
    documents = read_labelled(config.data, criteria)
    tokenizer = TextTokenizer.load(config.init)
    answer_ids(tokenizer)  # fails early, in one line, for a tokenizer that cannot tell the answers apart
    model = load_language_model(config.init, device=here.device()).train()
    split = {name: [d for d in documents if d.split == name] for name in SPLITS}

    def batches(epoch: int) -> list[LabelledDocument]:
        order = np.random.default_rng([config.train.seed, epoch]).permutation(len(split["train"]))
        return [split["train"][i] for i in order]

    def loss_fn(scored, document: LabelledDocument):
        labels = [document.labels[c.name] for c in criteria]
        return slot_loss(scored, tokenizer, document.text, criteria, labels, config.max_document_tokens), len(labels)

    def evaluate(scored) -> float:
        losses = [float(loss_fn(scored, d)[0]) for d in split["tuning"]]
        return float(np.mean(losses))

    trainer = Trainer(model, loss_fn, batches, config.train, run_dir, progress, evaluate)
    result = trainer.fit()
    if not here.main:
        return {}
    model_dir = export_model(trainer, tokenizer, run_dir / "model")
    chosen = load_language_model(model_dir, device=here.device())
    scores = {name: criterion_scores(chosen, tokenizer, [d.text for d in split[name]], criteria,
                                     config.max_document_tokens) for name in ("tuning", "test")}  # fmt: skip
    metrics = {"model": str(model_dir), "steps": result.steps, "best_tuning_loss": result.best}
    return _write_results(config, criteria, split, scores, run_dir, metrics)


BASELINES = ("tfidf", "pooled")


def run_baseline(config: ClassifyConfig, run_dir: str | Path, kind: str = "tfidf") -> dict:
    """The same data, splits, thresholds and metrics with one class-balanced logistic regression per criterion
    (scikit-learn), fitted on the train split, over document features: `tfidf` (word 1-2-grams, sublinear tf) or
    `pooled` (the mean of the `init` model's final hidden states over the document, the model frozen: a linear head
    on the Mamba's pooled states). Scores are the regressions' log-odds; a criterion with one class only in train
    scores every document the same."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    if kind not in BASELINES:
        raise MedstateError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    criteria = read_criteria(config.criteria)
    documents = read_labelled(config.data, criteria)
    split = {name: [d for d in documents if d.split == name] for name in SPLITS}
    if kind == "tfidf":
        vectorizer = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1, max_features=50_000)
        features = {"train": vectorizer.fit_transform([d.text for d in split["train"]])}
        features.update({name: vectorizer.transform([d.text for d in split[name]]) for name in ("tuning", "test")})
    else:
        features = {name: _pooled_states(config, [d.text for d in split[name]]) for name in SPLITS}
    train_labels = _matrix(split["train"], criteria)
    scores = {name: np.zeros((len(split[name]), len(criteria))) for name in ("tuning", "test")}
    for k in range(len(criteria)):
        if train_labels[:, k].all() or not train_labels[:, k].any():
            continue  # one class in train: a constant score
        regression = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000, random_state=config.train.seed)
        regression.fit(features["train"], train_labels[:, k])
        for name in ("tuning", "test"):
            scores[name][:, k] = regression.decision_function(features[name])
    name = (
        "tfidf + logistic regression" if kind == "tfidf" else f"logistic regression on pooled states of {config.init}"
    )
    return _write_results(config, criteria, split, scores, run_dir, {"model": name})


@torch.no_grad()
def _pooled_states(config: ClassifyConfig, texts: list[str]) -> np.ndarray:
    """[documents, d_model]: the mean final hidden state over each document's tokens (read in segments)."""
    from medstate.text.choices import encode_prompt

    model, tokenizer = load_pretrained(config.init).eval(), TextTokenizer.load(config.init)
    rows = []
    for text in texts:
        ids = torch.tensor([encode_prompt(tokenizer, text, config.max_document_tokens)])
        rows.append(model.prefill(ids, segment_length=4096).hidden_states[0].mean(0).double().numpy())
    return np.stack(rows)


def _write_results(config, criteria, split, scores, run_dir: Path, metrics: dict) -> dict:
    """Thresholds from the tuning split's scores, applied once to the test split's: metrics.json, predictions.parquet
    and report.md in `run_dir`."""
    labels = {name: _matrix(split[name], criteria) for name in ("tuning", "test")}
    thresholds = tune_thresholds(labels["tuning"], scores["tuning"])  # the tuning split only
    subjects = [d.subject for d in split["test"]]
    metrics.update(
        documents={name: len(split[name]) for name in SPLITS},
        positives_test={c.name: int(labels["test"][:, i].sum()) for i, c in enumerate(criteria)},
        thresholds={
            "per_label": dict(zip([c.name for c in criteria], thresholds.per_label)),
            "global": thresholds.global_,
        },
    )
    for kind, chosen_thresholds in (("per_label", thresholds.per_label), ("global", thresholds.global_)):
        values = multilabel_metrics(labels["test"], scores["test"], chosen_thresholds, subjects, config.k,
                                    config.bootstrap)  # fmt: skip
        metrics[f"test_{kind}_thresholds"] = {name: dataclasses.asdict(v) for name, v in values.items()}
    rows = [
        {"id": d.id, "subject": d.subject, "split": name, "criterion": c.name, "label": bool(labels[name][r, i]),
         "score": float(scores[name][r, i])}
        for name in ("tuning", "test") for r, d in enumerate(split[name]) for i, c in enumerate(criteria)
    ]  # fmt: skip
    pl.DataFrame(rows).write_parquet(run_dir / "predictions.parquet")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    (run_dir / "report.md").write_text(report(metrics))
    return metrics


def report(metrics: dict) -> str:
    lines = [
        "# Prompt-based classification",
        "",
        f"Model: {metrics['model']}. Documents: {metrics['documents']}. Thresholds (and checkpoint) from the tuning "
        "split; the test split scored once.",
        "",
        "| metric | per-label thresholds | global threshold |",
        "|---|---|---|",
    ]
    for name, value in metrics["test_per_label_thresholds"].items():
        other = metrics["test_global_thresholds"][name]
        lines.append(f"| {name} | {format_interval(value)} | {format_interval(other)} |")
    return "\n".join(lines) + "\n"
