"""`prepare`: a MEDS dataset → model-ready EHR data (the input of pretraining, finetuning and the baselines).

Writes to OUT:

    vocab.json          tokens (fitted on the training split only)
    value_bins.json     per-code quantile edges of numeric values (training split only)
    tasks.yaml          the task suite used for the labels
    prepare.yaml        the resolved settings
    pretrain.parquet    one row per subject: full history, truncated to max_length (most recent kept)
    finetune.parquet    one row per (task, sample): the history known at the prediction time in prompted form
                        ([TASK] … [TASK]), its 0/1 label, prediction time and visit
    labels.parquet      the labels alone (subject_id, visit_key, prediction_time, label, task, split)

Every row carries the subject's split, so no subject crosses from training into evaluation.

Date-only events (codes matching `date_only_codes`: MIMIC-IV procedures and HCPCS, dated by `chartdate`, at 00:00;
and FHIR dates without a time, which the data layer marks `time_precision` = "day") may have happened at any time
of their day, so they are placed and known at the end of their day (23:59:59.999999):
a prediction at noon never sees a procedure done that afternoon. A finetuning input is the history known at the
prediction time (`PatientSequence.until`): events of stays that start later are hidden whatever their own date, and
at a discharge-time prediction the stay is closed with [VE] [REG], as pretraining shows every visit.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from medstate.data.meds import scan_meds
from medstate.ehr.sequences import (
    ARRAY_DTYPES,
    PROMPT_LAYOUTS,
    PatientSequence,
    ValueBins,
    build_sequence,
    visit_key_columns,
)
from medstate.ehr.tasks import TaskSuite
from medstate.ehr.visits import later_stay_keys
from medstate.ehr.vocab import Vocabulary
from medstate.errors import MedstateError

SEQUENCE_COLUMNS = {name: pl.List(dtype) for name, dtype in ARRAY_DTYPES.items()}


@dataclass
class PrepareConfig:
    max_length: int = 2048
    visit: str = "auto"
    value_bins: int = 5
    min_count: int = 1
    tasks: str | None = None  # a task YAML file; None: the six EhrMamba tasks
    # at most this many samples per subject, for tasks that set no cap of their own (None: all)
    max_samples_per_subject: int | None = None
    seed: int = 0  # of the draw of capped samples
    # codes whose times are dates (00:00 stands for "some time that day"): known at the end of the day
    date_only_codes: tuple[str, ...] = ("^PROCEDURE//ICD//", "^HCPCS//")
    # finetuning inputs: the task token first and last (EhrMamba), or `last` only ([CLS] first): one shared
    # history for all tasks, so a server keeps one recurrent state per patient instead of one per task
    prompt: str = "both"


@dataclass
class PrepareSummary:
    output: Path
    subjects: dict[str, int]
    vocabulary: int
    samples: dict[str, dict[str, int]]  # task → {"n": …, "positives": …}


def prepare(
    meds_dir: str | Path | list[str | Path],
    output: str | Path,
    config: PrepareConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> PrepareSummary:
    config = config or PrepareConfig()
    visit_key_columns(config.visit)  # validates the name
    if config.prompt not in PROMPT_LAYOUTS:
        raise MedstateError(f"prompt must be one of {', '.join(PROMPT_LAYOUTS)}, got {config.prompt!r}")
    if config.max_length < 8:
        raise MedstateError(f"max_length must be at least 8, got {config.max_length}")
    suite = TaskSuite.load(config.tasks)
    events = at_end_of_day(read_datasets(meds_dir), config.date_only_codes)
    splits = events.select("subject_id", "split").unique("subject_id", keep="first")
    if "train" not in set(splits["split"]):
        raise MedstateError(f"{meds_dir} has no train split: vocabulary and value bins are fitted on it")
    train_ids = splits.filter(pl.col("split") == "train")["subject_id"]
    bins = ValueBins(config.value_bins).fit(events.filter(pl.col("subject_id").is_in(train_ids.implode())))
    keep = [
        "subject_id",
        "time",
        "code",
        "numeric_value",
        *(c for c in ("hadm_id", "encounter_id") if c in events.columns),
    ]
    by_subject = events.select(keep).partition_by("subject_id", as_dict=True, maintain_order=True)
    sequences: dict[int, PatientSequence] = {}
    for done, ((subject_id,), subject_events) in enumerate(sorted(by_subject.items()), start=1):
        sequences[subject_id] = build_sequence(subject_id, subject_events, bins, config.visit)
        if progress:
            progress(done, len(by_subject))
    train_set = set(train_ids.to_list())
    vocab = Vocabulary.fit(
        (s.tokens for sid, s in sequences.items() if sid in train_set),
        min_count=config.min_count,
        task_tokens=[t.token for t in suite.tasks],
    )
    split_of = dict(splits.iter_rows())
    labels = suite.label(events).with_columns(pl.col("subject_id").replace_strict(split_of).alias("split"))
    caps = {t.name: t.max_samples_per_subject or config.max_samples_per_subject for t in suite.tasks}
    labels = cap_per_subject(labels, caps, config.seed)

    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    vocab.save(out / "vocab.json")
    (out / "value_bins.json").write_text(json.dumps({"n_bins": bins.n_bins, "edges": bins.edges}) + "\n")
    (out / "tasks.yaml").write_text(suite.to_yaml())
    sources = [str(d) for d in ([meds_dir] if isinstance(meds_dir, (str, Path)) else meds_dir)]
    (out / "prepare.yaml").write_text(yaml.safe_dump({**_plain(asdict(config)), "meds_dirs": sources}))

    pretrain = [
        {"subject_id": sid, "split": split_of[sid], **_arrays(seq.truncate(config.max_length), vocab)}
        for sid, seq in sorted(sequences.items())
    ]
    pl.DataFrame(pretrain, schema={"subject_id": pl.Int64, "split": pl.String, **SEQUENCE_COLUMNS}).write_parquet(
        out / "pretrain.parquet"
    )
    task_of = {t.name: t for t in suite.tasks}
    hidden = later_stay_keys(suite.stays(events), labels)
    finetune = []
    for row, hidden_keys in zip(labels.iter_rows(named=True), hidden):
        task = task_of[row["task"]]
        history = sequences[row["subject_id"]].until(row["prediction_time"], hidden_keys, close=task.closes_visit)
        prompted = history.prompted(task.token, config.max_length, config.prompt)
        finetune.append({**row, **_arrays(prompted, vocab)})
    schema = {**dict(labels.schema), **SEQUENCE_COLUMNS}
    pl.DataFrame(finetune, schema=schema).write_parquet(out / "finetune.parquet")
    labels.write_parquet(out / "labels.parquet")
    counts = labels.group_by("task").agg(pl.len().alias("n"), pl.col("label").sum().alias("positives"))
    return PrepareSummary(
        output=out,
        subjects=dict(splits.group_by("split").len().iter_rows()),
        vocabulary=len(vocab),
        samples={task: {"n": n, "positives": p} for task, n, p in counts.sort("task").iter_rows()},
    )


def cap_per_subject(labels: pl.DataFrame, caps: dict[str, int | None], seed: int) -> pl.DataFrame:
    """At most `caps[task]` rows per (task, subject) (None: all), chosen uniformly at random (seeded) regardless of
    the label, so the kept rows are an unbiased sample of each subject's prediction times."""
    if any(cap is not None and cap < 1 for cap in caps.values()):
        raise MedstateError(f"max_samples_per_subject must be at least 1, got {caps}")
    # each row's draw depends only on (seed, task, subject, visit), so a change elsewhere in the labels never redraws it
    text = labels.select(pl.format("{}|{}|{}|{}", pl.lit(seed), "task", "subject_id", "visit_key")).to_series()
    keys = np.asarray([int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "big") for t in text])
    cap = pl.col("task").replace_strict({t: c or len(labels) for t, c in caps.items()}, return_dtype=pl.Int64)
    ranked = labels.with_columns(pl.Series("_key", keys)).with_columns(
        pl.col("_key").rank("ordinal").over("task", "subject_id").alias("_rank")
    )
    return ranked.filter(pl.col("_rank") <= cap).drop("_key", "_rank")


def at_end_of_day(events: pl.DataFrame, date_only_codes: tuple[str, ...]) -> pl.DataFrame:
    """Date-only events moved to the last microsecond of their day: those of `date_only_codes` dated at 00:00, and
    those whose `time_precision` is "day" (FHIR dates without a time), birth excepted (it only gives the age)."""
    matches = pl.any_horizontal(pl.lit(False), *(pl.col("code").str.contains(p) for p in date_only_codes))
    if "time_precision" in events.columns:
        matches = matches | ((pl.col("time_precision") == "day") & (pl.col("code") != "MEDS_BIRTH")).fill_null(False)
    midnight = pl.col("time") == pl.col("time").dt.truncate("1d")
    end_of_day = pl.col("time") + timedelta(days=1) - timedelta(microseconds=1)
    return events.with_columns(pl.when(matches & midnight).then(end_of_day).otherwise(pl.col("time")).alias("time"))


def read_datasets(meds_dirs: str | Path | list[str | Path]) -> pl.DataFrame:
    """One or several MEDS datasets as one event table (each keeps its splits); subject ids must not collide."""
    dirs = [meds_dirs] if isinstance(meds_dirs, (str, Path)) else list(meds_dirs)
    frames = [scan_meds(d).collect() for d in dirs]
    if len(frames) > 1:
        seen: set[int] = set()
        for directory, frame in zip(dirs, frames):
            ids = set(frame["subject_id"].unique().to_list())
            if ids & seen:
                raise MedstateError(f"{directory} shares subject ids with another dataset; convert them apart")
            seen |= ids
    return pl.concat(frames, how="diagonal_relaxed")


def _arrays(sequence: PatientSequence, vocab: Vocabulary) -> dict:
    return {
        "input_ids": vocab.encode(sequence.tokens),
        "token_types": sequence.token_types.tolist(),
        "ages": sequence.ages.tolist(),
        "times": sequence.times.tolist(),
        "visit_segments": sequence.visit_segments.tolist(),
        "visit_orders": sequence.visit_orders.tolist(),
    }


def _plain(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
