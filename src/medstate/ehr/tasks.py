"""Prediction tasks as declarative labelers: a task is plain data (YAML), never code in a notebook.

A task labels *anchor visits* from a named visit set: "inpatient" (the default: MIMIC-IV HOSPITAL_ADMISSION/
DISCHARGE joined on hadm_id, and FHIR inpatient encounters ENCOUNTER_START//IMP / ENCOUNTER_END//IMP joined on
encounter_id) or "any" (also every other FHIR encounter); a task file may define more. Each
visit gives at most one sample: a prediction time (the visit's start or end plus an offset) and a 0/1 label. The
model may only see events at or before the prediction time (`events_until`); every label is decided by events
strictly after it, and a sample whose outcome is already known at the prediction time is left out.

Kinds of label:

    event_within       an event matching `codes` in (t, t + window_days]        e.g. 30-day mortality
    duration_over      the visit lasts more than `duration_days`                e.g. length of stay > 7 days
    next_visit_within  the next anchor visit starts in (t, t + window_days]     e.g. 30-day readmission
    onset_next_visit   a code of `code_set` is recorded during the next visit,  e.g. hypertension onset
                       and none at or before t

`exclude_codes` (regular expressions): a sample is left out when such an event happened at or before t (e.g.
MEDS_DEATH for mortality and readmission: the patient died in hospital).

`max_samples_per_subject`: visit-level tasks over outpatient data give dozens of samples per subject (every
encounter is an anchor); `prepare` keeps at most this many per subject, drawn uniformly at random regardless of
the label.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path

import polars as pl
import yaml

from medstate.errors import MedstateError

KINDS = ("event_within", "duration_over", "next_visit_within", "onset_next_visit")
LABEL_SCHEMA = {
    "subject_id": pl.Int64,
    "visit_key": pl.String,
    "prediction_time": pl.Datetime("us"),
    "label": pl.Int8,
    "task": pl.String,
}


@dataclass(frozen=True)
class VisitRule:
    """Anchor visits: an event matching `start` and one matching `end` that share the value of `key`."""

    start: str
    end: str
    key: str


ADMISSIONS = VisitRule(start="^HOSPITAL_ADMISSION//", end="^HOSPITAL_DISCHARGE//", key="hadm_id")
DEFAULT_VISIT_SETS = {
    # hospital stays: MIMIC-IV admissions and FHIR inpatient encounters
    "inpatient": (
        ADMISSIONS,
        VisitRule(start="^ENCOUNTER_START//IMP$", end="^ENCOUNTER_END//IMP$", key="encounter_id"),
    ),
    # any contact: also FHIR ambulatory and emergency encounters (where outpatient diagnoses are recorded)
    "any": (ADMISSIONS, VisitRule(start="^ENCOUNTER_START//", end="^ENCOUNTER_END//", key="encounter_id")),
}
DEFAULT_VISITS = DEFAULT_VISIT_SETS["inpatient"]


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
    visits: str = "inpatient"  # the name of a visit set: which visits are anchors (and "next visits")
    # keep at most this many samples per subject, drawn uniformly at random whatever their label (None: all)
    max_samples_per_subject: int | None = None
    description: str = ""

    def __post_init__(self):
        problems = []
        if self.kind not in KINDS:
            problems.append(f"kind must be one of {', '.join(KINDS)}")
        if self.prediction not in ("visit_start", "visit_end"):
            problems.append("prediction must be visit_start or visit_end")
        needs = {"event_within": ("window_days", "codes"), "duration_over": ("duration_days",),
                 "next_visit_within": ("window_days",), "onset_next_visit": ("code_set",)}  # fmt: skip
        for name in needs.get(self.kind, ()):
            if not getattr(self, name):
                problems.append(f"{self.kind} needs {name}")
        if self.max_samples_per_subject is not None and self.max_samples_per_subject < 1:
            problems.append("max_samples_per_subject must be at least 1")
        if problems:
            raise MedstateError(f"task {self.name!r}: " + "; ".join(problems))

    @property
    def token(self) -> str:
        return f"[TASK_{self.name.upper()}]"

    @classmethod
    def from_dict(cls, data: dict) -> TaskSpec:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise MedstateError(f"task {data.get('name')!r}: unknown field(s) {sorted(unknown)}")
        data = {k: tuple(v) if k in ("codes", "exclude_codes") else v for k, v in data.items()}
        return cls(**data)


@dataclass(frozen=True)
class TaskSuite:
    tasks: tuple[TaskSpec, ...]
    visit_sets: dict[str, tuple[VisitRule, ...]] = field(default_factory=lambda: dict(DEFAULT_VISIT_SETS))
    code_sets: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # name → ((code, match), …)

    @classmethod
    def load(cls, path: str | Path | None = None) -> TaskSuite:
        """A YAML file with `tasks:` (and optionally `visit_sets:` and `code_sets:`); default: the six EhrMamba
        tasks."""
        if path is None:
            text = resources.files("medstate.ehr").joinpath("resources/tasks.yaml").read_text()
        else:
            try:
                text = Path(path).read_text()
            except OSError as err:
                raise MedstateError(f"cannot read task file {path}: {err.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise MedstateError(f"task file {path} is not valid YAML: {err}") from None
        tasks = tuple(TaskSpec.from_dict(t) for t in data.get("tasks") or [])
        if not tasks:
            raise MedstateError(f"task file {path} defines no tasks")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise MedstateError(f"task file {path} repeats a task name: {names}")
        visit_sets = dict(DEFAULT_VISIT_SETS)
        for name, rules in (data.get("visit_sets") or {}).items():
            visit_sets[name] = tuple(VisitRule(**rule) for rule in rules)
        code_sets = load_code_sets()
        for name, entries in (data.get("code_sets") or {}).items():
            code_sets[name] = tuple((e["code"], e.get("match", "prefix")) for e in entries)
        for task in tasks:
            if task.code_set and task.code_set not in code_sets:
                raise MedstateError(f"task {task.name!r}: unknown code_set {task.code_set!r}")
            if task.visits not in visit_sets:
                raise MedstateError(f"task {task.name!r}: unknown visit set {task.visits!r}")
        return cls(tasks=tasks, visit_sets=visit_sets, code_sets=code_sets)

    def label(self, events: pl.DataFrame) -> pl.DataFrame:
        """Labels of every task (subject_id, visit_key, prediction_time, label, task) for these events."""
        visits = {name: anchor_visits(events, rules) for name, rules in self.visit_sets.items()}
        frames = [label_task(task, events, visits[task.visits], self.code_sets) for task in self.tasks]
        return pl.concat(frames).sort(["task", "subject_id", "prediction_time", "visit_key"])


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


def anchor_visits(events: pl.DataFrame, rules: tuple[VisitRule, ...] = DEFAULT_VISITS) -> pl.DataFrame:
    """(subject_id, visit_key, start, end) of every anchor visit, sorted by subject and start."""
    frames = []
    for rule in rules:
        if rule.key not in events.columns:
            continue
        keyed = events.filter(pl.col(rule.key).is_not_null() & pl.col("time").is_not_null()).with_columns(
            (pl.lit(f"{rule.key}:") + pl.col(rule.key).cast(pl.String)).alias("visit_key")
        )
        starts = (
            keyed.filter(pl.col("code").str.contains(rule.start))
            .group_by("subject_id", "visit_key")
            .agg(pl.col("time").min().alias("start"))
        )
        ends = (
            keyed.filter(pl.col("code").str.contains(rule.end))
            .group_by("subject_id", "visit_key")
            .agg(pl.col("time").max().alias("end"))
        )
        frames.append(starts.join(ends, on=["subject_id", "visit_key"]).filter(pl.col("end") >= pl.col("start")))
    schema = {"subject_id": pl.Int64, "visit_key": pl.String, "start": pl.Datetime("us"), "end": pl.Datetime("us")}
    if not frames:
        return pl.DataFrame(schema=schema)
    return pl.concat(frames).select(schema.keys()).cast(schema).sort(["subject_id", "start", "visit_key"])


def label_task(
    task: TaskSpec, events: pl.DataFrame, visits: pl.DataFrame, code_sets: dict | None = None
) -> pl.DataFrame:
    offset = timedelta(hours=task.offset_hours)
    anchor = pl.col("start") if task.prediction == "visit_start" else pl.col("end")
    samples = visits.with_columns(
        (anchor + offset).alias("prediction_time"),
        pl.col("start").shift(-1).over("subject_id").alias("next_start"),
        pl.col("end").shift(-1).over("subject_id").alias("next_end"),
    )
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
        # the next admission is the next anchor visit that starts after the prediction time
        later = samples.select("subject_id", pl.col("start").alias("other_start"))
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


def events_until(events: pl.DataFrame, subject_id: int, prediction_time) -> pl.DataFrame:
    """The events a model may see for a sample: the subject's static facts and events at or before the time."""
    mine = events.filter(pl.col("subject_id") == subject_id)
    return mine.filter(pl.col("time").is_null() | (pl.col("time") <= prediction_time))
