"""Prediction tasks as declarative labelers: a task is plain data (YAML), never code in a notebook.

Each task predicts at an anchor visit (`ehr.visits`: stays found by rules, merged into episodes, in-hospital death).

**What the model sees.** A sample's input is the subject's static facts and events dated at or before the
prediction time, except events of a stay that starts after the prediction time, whatever their own date (the next
stay's ED registration hours before this discharge, a mis-dated order): `ehr.visits.later_stay_keys` lists them and
`PatientSequence.until` leaves them out. Every label is decided by events strictly after the prediction time, and a
sample whose outcome is already known at the prediction time is left out.

Kinds of label:

    event_within       an event matching `codes` in (t, t + window_days]        e.g. 30-day mortality
    duration_over      the episode lasts more than `duration_days` (strictly)   e.g. length of stay > 7 days
    next_visit_within  the next episode starts in (t, t + window_days]          e.g. 30-day readmission
    onset_next_visit   a code of `code_set` is recorded during the next         e.g. hypertension onset
                       episode, and none at or before t
    meds_labels        the rows of a MEDS label file (`labels`: a parquet file or a folder of them, as ACES /
                       `aces-cli` and the MEDS-DEV tasks write them): subject_id, prediction_time, boolean_value;
                       the input is what is known at prediction_time (a visit still open stays open)

`exclude_codes` (regular expressions): a sample is left out when such an event happened at or before t.

`max_samples_per_subject`: visit-level tasks over outpatient data give dozens of samples per subject (every
encounter is an anchor); `prepare` keeps at most this many per subject, drawn uniformly at random regardless of
the label.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta
from importlib import resources
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from medstate.ehr.visits import DEFAULT_VISIT_SETS, VisitSet, anchor_visits, find_stays
from medstate.errors import MedstateError
from medstate.loading import compile_pattern, expect_mapping, from_data, parse_yaml, read_text

KINDS = ("event_within", "duration_over", "next_visit_within", "onset_next_visit", "meds_labels")
LABEL_SCHEMA = {
    "subject_id": pl.Int64,
    "visit_key": pl.String,
    "prediction_time": pl.Datetime("us"),
    "label": pl.Int8,
    "task": pl.String,
}


@dataclass(frozen=True)
class TaskSpec:
    name: str
    kind: str
    prediction: str = "visit_end"  # or "visit_start"
    offset_hours: float = 0.0
    window_days: float | None = None
    duration_days: float | None = None
    codes: tuple[str, ...] = ()
    code_set: str | None = None
    exclude_codes: tuple[str, ...] = ()
    exclude_in_hospital_death: bool = False
    visits: str = "inpatient"  # the name of a visit set: which visits are anchors (and "next visits")
    # keep at most this many samples per subject, drawn uniformly at random whatever their label (None: all)
    max_samples_per_subject: int | None = None
    labels: str | None = None  # meds_labels: the label file or folder (relative: to the task file's folder)
    description: str = ""

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(KINDS)}")
        if self.prediction not in ("visit_start", "visit_end"):
            problems.append("prediction must be visit_start or visit_end")
        needs = {"event_within": ("window_days", "codes"), "duration_over": ("duration_days",),
                 "next_visit_within": ("window_days",), "onset_next_visit": ("code_set",),
                 "meds_labels": ("labels",)}  # fmt: skip
        for name in needs.get(self.kind, ()):
            if not getattr(self, name):
                problems.append(f"{self.kind} needs {name}")
        if self.max_samples_per_subject is not None and self.max_samples_per_subject < 1:
            problems.append("max_samples_per_subject must be at least 1")
        for pattern in (*self.codes, *self.exclude_codes):
            compile_pattern(pattern, "codes")
        if problems:
            raise MedstateError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def token(self) -> str:
        return f"[TASK_{self.name.upper()}]"

    @property
    def closes_visit(self) -> bool:
        """Predicted at (or after) the visit's end: the input shows the visit closed, as pretraining does."""
        return self.kind != "meds_labels" and self.prediction == "visit_end" and self.offset_hours >= 0


@dataclass(frozen=True)
class CodeSetEntry:
    code: str
    match: str = "prefix"

    def __post_init__(self):
        if self.match not in ("prefix", "exact"):
            raise MedstateError(f"match must be prefix or exact, got {self.match!r}")


@dataclass(frozen=True)
class TaskSuite:
    tasks: tuple[TaskSpec, ...]
    visit_sets: dict[str, VisitSet] = field(default_factory=lambda: dict(DEFAULT_VISIT_SETS))
    code_sets: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # name → ((code, match), …)

    @classmethod
    def load(cls, path: str | Path | None = None) -> TaskSuite:
        """A YAML file with `tasks:` (and optionally `visit_sets:` and `code_sets:`); default: the six EhrMamba
        tasks."""
        if path is None:
            text, where = resources.files("medstate.ehr").joinpath("resources/tasks.yaml").read_text(), "tasks.yaml"
        else:
            text, where = read_text(path, "task file"), f"task file {path}"
        return cls.from_yaml(text, where, Path(path).parent if path is not None else None)

    @classmethod
    def from_yaml(cls, text: str, where: str = "tasks.yaml", base: Path | None = None) -> TaskSuite:
        """A suite from a task file's text (`where` names it in errors; `base`: the folder relative label paths
        start from)."""
        data = expect_mapping(parse_yaml(text, where) or {}, where)
        unknown = sorted(set(data) - {"tasks", "visit_sets", "code_sets"})
        if unknown:
            raise MedstateError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: tasks, visit_sets, code_sets")
        entries = data.get("tasks") or []
        if not isinstance(entries, list) or not entries:
            raise MedstateError(f"{where} defines no tasks (expected a list under tasks:)")
        tasks = tuple(
            _with_label_path(from_data(TaskSpec, t, f"{where}: tasks[{i}]"), base, where) for i, t in enumerate(entries)
        )
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise MedstateError(f"{where} repeats a task name: {names}")
        visit_sets = dict(DEFAULT_VISIT_SETS)
        for name, value in expect_mapping(data.get("visit_sets") or {}, f"{where}: visit_sets").items():
            value = {"rules": value} if isinstance(value, list) else value  # a bare list of rules is allowed
            visit_sets[name] = from_data(VisitSet, value, f"{where}: visit_sets.{name}")
        code_sets = load_code_sets()
        for name, value in expect_mapping(data.get("code_sets") or {}, f"{where}: code_sets").items():
            if not isinstance(value, list) or not value:
                raise MedstateError(f"{where}: code_sets.{name} must be a non-empty list of {{code, match}}")
            parsed = [from_data(CodeSetEntry, e, f"{where}: code_sets.{name}[{i}]") for i, e in enumerate(value)]
            code_sets[name] = tuple((e.code, e.match) for e in parsed)
        for task in tasks:
            if task.code_set and task.code_set not in code_sets:
                raise MedstateError(f"{where}: task {task.name!r}: unknown code_set {task.code_set!r}")
            if task.visits not in visit_sets:
                raise MedstateError(f"{where}: task {task.name!r}: unknown visit set {task.visits!r}")
        return cls(tasks=tasks, visit_sets=visit_sets, code_sets=code_sets)

    def to_yaml(self) -> str:
        """The suite as a task file that `load` reads back to an equal suite."""

        def plain(value):
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value

        def task(t):
            return {k: plain(v) for k, v in asdict(t).items() if v not in (None, (), "", [], False)}

        data = {
            "tasks": [task(t) for t in self.tasks],
            "visit_sets": {
                name: {"rules": [asdict(r) for r in s.rules], "merge_within_hours": s.merge_within_hours}
                for name, s in self.visit_sets.items()
            },
            "code_sets": {
                name: [{"code": c, "match": m} for c, m in entries] for name, entries in sorted(self.code_sets.items())
            },
        }
        return yaml.safe_dump(data, sort_keys=False)

    def label(self, events: pl.DataFrame) -> pl.DataFrame:
        """Labels of every task (subject_id, visit_key, prediction_time, label, task) for these events."""
        visits = {name: anchor_visits(events, visit_set) for name, visit_set in self.visit_sets.items()}
        frames = [label_task(task, events, visits[task.visits], self.code_sets) for task in self.tasks]
        return pl.concat(frames).sort(["task", "subject_id", "prediction_time", "visit_key"])

    def columns(self) -> set[str]:
        """The event columns the visit rules read besides subject_id, time and code (keys, death signals)."""
        return {c for s in self.visit_sets.values() for r in s.rules for c in (r.key, *r.died)}

    def stays(self, events: pl.DataFrame) -> pl.DataFrame:
        """Every stay of every visit set, unmerged (subject_id, visit_key, start, end, died)."""
        frames = [find_stays(events, s.rules) for s in self.visit_sets.values()]
        return pl.concat(frames).unique(["subject_id", "visit_key"], keep="first").sort("subject_id", "start")


def _with_label_path(task: TaskSpec, base: Path | None, where: str) -> TaskSpec:
    """A meds_labels task with its label path made absolute and checked (units read it from other processes)."""
    if task.labels is None:
        return task
    path = Path(task.labels) if base is None else (base / task.labels)
    if not path.exists():
        raise MedstateError(f"{where}: task {task.name!r}: label file {path} not found")
    files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
    if not files:
        raise MedstateError(f"{where}: task {task.name!r}: no .parquet label files under {path}")
    try:
        columns = pl.read_parquet_schema(files[0])
    except (OSError, pl.exceptions.PolarsError) as err:
        raise MedstateError(f"{where}: task {task.name!r}: {files[0]} is not a readable parquet file ({err})") from None
    missing = [c for c in ("subject_id", "prediction_time", "boolean_value") if c not in columns]
    if missing:
        raise MedstateError(
            f"{where}: task {task.name!r}: {files[0]} lacks {', '.join(missing)} (binary MEDS labels are read)"
        )
    return replace(task, labels=str(path.resolve()))


def meds_labels(task: TaskSpec, events: pl.DataFrame) -> pl.DataFrame:
    """The label file's rows of these events' subjects (a row without a value is left out)."""
    path = Path(task.labels)
    source = pl.scan_parquet(path if path.is_file() else path / "**" / "*.parquet")
    subjects = events.select(pl.col("subject_id").unique())
    rows = (
        source.select(
            pl.col("subject_id").cast(pl.Int64),
            pl.col("prediction_time").cast(pl.Datetime("us")),
            pl.col("boolean_value").cast(pl.Int8).alias("label"),
        )
        .filter(pl.col("label").is_not_null())
        .join(subjects.lazy(), on="subject_id", how="semi")
        .unique(["subject_id", "prediction_time"], keep="first", maintain_order=True)
        .collect()
    )
    at = pl.concat_str(pl.lit("at:"), pl.col("prediction_time").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f"))
    return rows.select("subject_id", at.alias("visit_key"), "prediction_time", "label", pl.lit(task.name).alias("task"))


def load_code_sets() -> dict[str, tuple[tuple[str, str], ...]]:
    text = resources.files("medstate.ehr").joinpath("resources/code_sets.csv").read_text()
    sets: dict[str, list] = {}
    for row in csv.DictReader(text.splitlines()):
        sets.setdefault(row["code_set"], []).append((row["code"], row["match"]))
    return {name: tuple(entries) for name, entries in sets.items()}


def code_set_filter(entries: tuple[tuple[str, str], ...]) -> pl.Expr:
    exact = [code for code, match in entries if match == "exact"]
    prefixes = [code for code, match in entries if match == "prefix"]
    expr = pl.col("code").is_in(exact)
    for prefix in prefixes:
        expr = expr | pl.col("code").str.starts_with(prefix)
    return expr


def _matches_any(patterns: tuple[str, ...]) -> pl.Expr:
    return pl.any_horizontal(*(pl.col("code").str.contains(p) for p in patterns)) if patterns else pl.lit(False)


def label_task(
    task: TaskSpec, events: pl.DataFrame, visits: pl.DataFrame, code_sets: dict | None = None
) -> pl.DataFrame:
    if task.kind == "meds_labels":
        return meds_labels(task, events).cast(LABEL_SCHEMA)
    offset = timedelta(hours=task.offset_hours)
    anchor = pl.col("start") if task.prediction == "visit_start" else pl.col("end")
    episodes = visits.with_columns(
        (anchor + offset).alias("prediction_time"),
        pl.col("start").shift(-1).over("subject_id").alias("next_start"),
        pl.col("end").shift(-1).over("subject_id").alias("next_end"),
    )
    samples = episodes.filter(~pl.col("died")) if task.exclude_in_hospital_death else episodes
    if task.exclude_codes:
        samples = _drop_if_before(samples, events.filter(_matches_any(task.exclude_codes)))
    if task.kind == "event_within":
        window = timedelta(days=task.window_days)
        outcome = events.filter(_matches_any(task.codes) & pl.col("time").is_not_null()).select("subject_id", "time")
        samples = _drop_if_before(samples, outcome)
        hits = samples.join(outcome, on="subject_id").filter(
            (pl.col("time") > pl.col("prediction_time")) & (pl.col("time") <= pl.col("prediction_time") + window)
        )
        samples = samples.with_columns(_in(samples, hits).alias("label"))
    elif task.kind == "duration_over":
        samples = samples.filter(pl.col("end") > pl.col("prediction_time"))  # still in hospital when predicting
        samples = samples.with_columns(
            ((pl.col("end") - pl.col("start")) > timedelta(days=task.duration_days)).alias("label")
        )
    elif task.kind == "next_visit_within":
        window = timedelta(days=task.window_days)
        # every later episode counts, those ending in death included
        later = episodes.select("subject_id", pl.col("start").alias("other_start"))
        hits = samples.join(later, on="subject_id").filter(
            (pl.col("other_start") > pl.col("prediction_time"))
            & (pl.col("other_start") <= pl.col("prediction_time") + window)
        )
        samples = samples.with_columns(_in(samples, hits).alias("label"))
    else:  # onset_next_visit
        entries = (code_sets or load_code_sets()).get(task.code_set)
        if entries is None:
            raise MedstateError(f"task {task.name!r}: unknown code_set {task.code_set!r}")
        condition = events.filter(code_set_filter(entries) & pl.col("time").is_not_null()).select("subject_id", "time")
        samples = samples.filter(
            pl.col("next_start").is_not_null() & (pl.col("next_start") > pl.col("prediction_time"))
        )
        samples = _drop_if_before(samples, condition)
        hits = samples.join(condition, on="subject_id").filter(
            (pl.col("time") >= pl.col("next_start")) & (pl.col("time") <= pl.col("next_end"))
        )
        samples = samples.with_columns(_in(samples, hits).alias("label"))
    return samples.select(
        "subject_id", "visit_key", "prediction_time", pl.col("label").cast(pl.Int8), pl.lit(task.name).alias("task")
    ).cast(LABEL_SCHEMA)


def _in(samples: pl.DataFrame, hits: pl.DataFrame) -> pl.Expr:
    keys = hits.select(pl.concat_str("subject_id", "visit_key", separator="|").unique()).to_series()
    return pl.concat_str("subject_id", "visit_key", separator="|").is_in(keys.implode())


def _drop_if_before(samples: pl.DataFrame, outcome: pl.DataFrame) -> pl.DataFrame:
    """Leave out samples with an outcome event at or before their prediction time."""
    first = (
        outcome.filter(pl.col("time").is_not_null()).group_by("subject_id").agg(pl.col("time").min().alias("_first"))
    )
    joined = samples.join(first, on="subject_id", how="left")
    return joined.filter(pl.col("_first").is_null() | (pl.col("_first") > pl.col("prediction_time"))).drop("_first")


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
