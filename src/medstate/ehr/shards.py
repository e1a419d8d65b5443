"""The map of `prepare`: one unit of work (a MEDS shard, or one range of subject ids of a shard too large to hold)
→ its subjects' token arrays, its samples and its training-token counts, written under `shards/<unit>/`.

A unit holds whole subjects (MEDS keeps each subject in one shard; a part of a shard is a range of ids), so everything
per subject (sequences, visits, episodes, labels, the per-subject sample cap) is computed from the unit alone and
equals what a pass over the whole cohort gives. Only the value bins (fitted before the map) and the vocabulary
(reduced from the units' counts after it) need the training split as a whole.

Written atomically: into `.<unit>.partial/`, renamed to `<unit>/` once every file is there, so a unit directory
that exists is finished, and a killed run redoes only the units it had not finished. Token ids are the unit's own
(`tokens.json`) until the vocabulary is known; `store.finalize_unit` then writes `input_ids.npy`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from medstate.data.meds import scan_meds_file
from medstate.ehr.sequences import ValueBins, at_end_of_day, build_sequence, visit_key_columns
from medstate.ehr.tasks import TaskSuite, cap_per_subject
from medstate.ehr.visits import later_stay_keys
from medstate.errors import MedstateError

# the stored per-token arrays besides input_ids: name → dtype (input_ids are int32, as ARRAY_DTYPES says)
STORED = {
    "local_ids": np.int32,
    "token_types": np.int8,
    "ages": np.float32,
    "times": np.float32,
    "visit_segments": np.int8,
    "visit_orders": np.int32,
    "timestamps": np.int64,
    "key_ids": np.int32,  # index into the unit's keys.json and key_starts.npy; -1: the token has no visit key
}
READ_COLUMNS = ("subject_id", "time", "code", "numeric_value", "time_precision")  # and what visits and tasks read
NOT_A_STAY = np.iinfo(np.int64).min  # key_starts of a visit key that is no stay (or has no start): never hidden
SUBJECT_SCHEMA = {
    "subject_id": pl.Int64,
    "split": pl.String,
    "start": pl.Int64,
    "stop": pl.Int64,
    "birth": pl.Datetime("us"),
    "first_time": pl.Datetime("us"),
}


@dataclass(frozen=True)
class Unit:
    """One MEDS shard file, or the subjects of it with ids in [low, high] (a range, so that a shard sorted by
    subject, as MEDS shards are, is read only in the row groups that hold them)."""

    name: str
    root: str  # the MEDS dataset directory
    path: str  # the shard file
    split: str
    low: int | None = None
    high: int | None = None

    def scan(self) -> pl.LazyFrame:
        frame = scan_meds_file(Path(self.root), Path(self.path))
        if self.low is not None:
            frame = frame.filter(pl.col("subject_id").is_between(self.low, self.high))
        return frame

    def events(self, columns: set[str] | None = None) -> pl.DataFrame:
        """The unit's events: every column, or those of `columns` the shard has."""
        frame = self.scan()
        if columns is not None:
            frame = frame.select(c for c in frame.collect_schema().names() if c in columns)
        return self._collect(frame)

    def subject_ids(self) -> pl.Series:
        """The unit's subject ids, sorted."""
        return self._collect(self.scan().select(pl.col("subject_id").unique().sort()))["subject_id"]

    def _collect(self, frame: pl.LazyFrame) -> pl.DataFrame:
        try:
            return frame.collect()
        except (pl.exceptions.PolarsError, OSError) as err:
            raise MedstateError(f"{self.path} cannot be read ({str(err).splitlines()[0]})") from None


@dataclass(frozen=True)
class UnitJob:
    """Everything a worker needs for one unit (plain data: it travels to another process or a Ray node)."""

    unit: Unit
    out: str  # the prepared directory
    visit: str
    max_length: int
    prompt: str
    date_only_codes: tuple[str, ...]
    default_cap: int | None
    seed: int
    bins: dict  # ValueBins as {"n_bins", "edges"}
    tasks_yaml: str


def unit_dir(out: str | Path, name: str) -> Path:
    return Path(out) / "shards" / name


def run_unit(job: UnitJob) -> str:
    """Prepare one unit (skipped when its directory is already there); returns the unit's name."""
    final = unit_dir(job.out, job.unit.name)
    if final.is_dir():
        return job.unit.name
    partial = final.with_name(f".{job.unit.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    _write_unit(job, partial)
    os.replace(partial, final)
    return job.unit.name


def _write_unit(job: UnitJob, folder: Path) -> None:
    suite = TaskSuite.from_yaml(job.tasks_yaml)
    bins = ValueBins(job.bins["n_bins"], job.bins["edges"])
    wanted = {*READ_COLUMNS, *visit_key_columns(job.visit), *suite.columns()}
    events = at_end_of_day(job.unit.events(wanted), job.date_only_codes)
    labels = suite.label(events).with_columns(pl.lit(job.unit.split).alias("split"))
    caps = {t.name: t.max_samples_per_subject or job.default_cap for t in suite.tasks}
    labels = cap_per_subject(labels, caps, job.seed)
    stays = suite.stays(events)
    hidden = later_stay_keys(stays, labels)
    stay_starts = {
        (subject, key): start for subject, key, start in stays.select(
            "subject_id", "visit_key", pl.col("start").dt.cast_time_unit("us").cast(pl.Int64)
        ).iter_rows() if start is not None
    }  # fmt: skip
    keep = ["subject_id", "time", "code", "numeric_value"]
    keep += [c for c in ("hadm_id", "encounter_id") if c in events.columns]
    by_subject = events.select(keep).partition_by("subject_id", as_dict=True, maintain_order=True)
    del events
    samples_of = (
        labels.with_columns(pl.Series("hidden", hidden, dtype=pl.List(pl.String)))
        .with_row_index("_index")
        .partition_by("subject_id", as_dict=True)
    )
    closes = {t.name: t.closes_visit for t in suite.tasks}
    tokens: dict[str, int] = {}  # the unit's own token ids
    keys: dict[tuple[int, str], int] = {}  # (subject, visit key) → the unit's key id
    counts: Counter = Counter()
    columns: dict[str, list[np.ndarray]] = {name: [] for name in STORED}
    subjects, lengths = [], np.zeros(len(labels), dtype=np.int64)
    start = 0
    for (subject_id,), subject_events in sorted(by_subject.items()):
        sequence = build_sequence(subject_id, subject_events, bins, job.visit)
        if job.unit.split == "train":
            counts.update(sequence.tokens)
        local = np.fromiter((tokens.setdefault(t, len(tokens)) for t in sequence.tokens), np.int32, len(sequence))
        key_ids = [-1 if k is None else keys.setdefault((subject_id, k), len(keys)) for k in sequence.visit_keys]
        for name, values in (("local_ids", local), ("key_ids", np.asarray(key_ids, dtype=np.int32))):
            columns[name].append(values)
        for name in ("token_types", "ages", "times", "visit_segments", "visit_orders", "timestamps"):
            columns[name].append(getattr(sequence, name).astype(STORED[name]))
        subjects.append((subject_id, job.unit.split, start, start + len(sequence), sequence.birth,
                         sequence.first_time))  # fmt: skip
        start += len(sequence)
        own = samples_of.get((subject_id,))
        for row in own.iter_rows(named=True) if own is not None else ():
            known = sequence.known_length(row["prediction_time"], row["hidden"], close=closes[row["task"]])
            lengths[row["_index"]] = min(known, job.max_length - 1) + 1  # the length `prompted` gives it
    for name, dtype in STORED.items():
        np.save(folder / f"{name}.npy", np.concatenate(columns[name]) if columns[name] else np.zeros(0, dtype))
    pl.DataFrame(subjects, schema=SUBJECT_SCHEMA, orient="row").write_parquet(folder / "subjects.parquet")
    labels.with_columns(pl.Series("length", lengths)).write_parquet(folder / "samples.parquet")
    (folder / "tokens.json").write_text(json.dumps(list(tokens)))
    (folder / "keys.json").write_text(json.dumps([key for _, key in keys]))
    # a sample's hidden stays are read back from these: the subject's keys whose stay starts after its time
    np.save(folder / "key_starts.npy", np.asarray([stay_starts.get(k, NOT_A_STAY) for k in keys], dtype=np.int64))
    (folder / "counts.json").write_text(json.dumps(counts))
