"""Prediction tasks as declarative labelers: a task is plain data (YAML), never code in a notebook.

**Anchor visits.** A visit set names rules that find stays: an event matching `start` and one matching `end` that
share the value of `key` (MIMIC-IV HOSPITAL_ADMISSION/DISCHARGE on hadm_id; FHIR ENCOUNTER_START/END on
encounter_id). Two sets come built in: "inpatient" (admissions and FHIR inpatient encounters, the default) and "any"
(also every other FHIR encounter). Stays of one subject that overlap, abut or start within `merge_within_hours`
(default 6) of the previous one's end are one **episode** (a transfer or a continued stay, not a readmission): its
start is the first stay's start, its end the last end, its key the first stay's. So back-to-back stays do not flip
between "readmitted" and "not" on one minute. Each episode gives at most one sample per task.

**In-hospital death.** An episode ended in death when any of its stays' end event says so (the rule's `died`:
column → regular expression, e.g. MIMIC-IV's `HOSPITAL_DISCHARGE//DIED` or `hospital_expire_flag` 1, FHIR's
discharge disposition `exp`), or when the subject's death (MEDS_DEATH) is dated at or before the end of the
episode's last day. Tasks with `exclude_in_hospital_death` leave such episodes out (mortality after discharge,
readmission), but they still count as the *next* visit of an earlier episode (a readmission that ends in death is a
readmission).

**What the model sees.** A sample's input is the subject's static facts and events dated at or before the
prediction time, except events of a stay that starts after the prediction time, whatever their own date (the next
stay's ED registration hours before this discharge, a mis-dated order): `later_stay_keys` lists them and
`PatientSequence.until` leaves them out. Every label is decided by events strictly after the prediction time, and a
sample whose outcome is already known at the prediction time is left out.

Kinds of label:

    event_within       an event matching `codes` in (t, t + window_days]        e.g. 30-day mortality
    duration_over      the episode lasts more than `duration_days` (strictly)   e.g. length of stay > 7 days
    next_visit_within  the next episode starts in (t, t + window_days]          e.g. 30-day readmission
    onset_next_visit   a code of `code_set` is recorded during the next         e.g. hypertension onset
                       episode, and none at or before t

`exclude_codes` (regular expressions): a sample is left out when such an event happened at or before t.

`max_samples_per_subject`: visit-level tasks over outpatient data give dozens of samples per subject (every
encounter is an anchor); `prepare` keeps at most this many per subject, drawn uniformly at random regardless of
the label.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from importlib import resources
from pathlib import Path

import polars as pl
import yaml

from medstate.errors import MedstateError
from medstate.loading import compile_pattern, expect_mapping, from_data, parse_yaml, read_text

KINDS = ("event_within", "duration_over", "next_visit_within", "onset_next_visit")
DEATH_CODE = "MEDS_DEATH"
LABEL_SCHEMA = {
    "subject_id": pl.Int64,
    "visit_key": pl.String,
    "prediction_time": pl.Datetime("us"),
    "label": pl.Int8,
    "task": pl.String,
}
STAY_SCHEMA = {
    "subject_id": pl.Int64,
    "visit_key": pl.String,
    "start": pl.Datetime("us"),
    "end": pl.Datetime("us"),
    "died": pl.Boolean,
}


@dataclass(frozen=True)
class VisitRule:
    """Stays: an event matching `start` and one matching `end` that share the value of `key`. `died`: column →
    regular expression; the stay ended in death when its end event matches any of them."""

    start: str
    end: str
    key: str
    died: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("start", "end"):
            compile_pattern(getattr(self, name), name)
        for column, pattern in self.died.items():
            compile_pattern(pattern, f"died.{column}")


@dataclass(frozen=True)
class VisitSet:
    rules: tuple[VisitRule, ...]
    merge_within_hours: float = 6.0  # stays closer than this to the previous one's end are one episode

    def __post_init__(self):
        if not self.rules:
            raise MedstateError("a visit set needs at least one rule")
        if self.merge_within_hours < 0:
            raise MedstateError(f"merge_within_hours must be 0 or more, got {self.merge_within_hours}")


ADMISSIONS = VisitRule(
    start="^HOSPITAL_ADMISSION//",
    end="^HOSPITAL_DISCHARGE//",
    key="hadm_id",
    died={"code": "//DIED$", "hospital_expire_flag": "^1$"},
)
FHIR_DIED = {"text_value": "(?i)^(exp|died|expired)$"}  # HL7 discharge-disposition "exp"; MIMIC-IV FHIR "DIED"
DEFAULT_VISIT_SETS = {
    # hospital stays: MIMIC-IV admissions and FHIR inpatient encounters
    "inpatient": VisitSet(
        (
            ADMISSIONS,
            VisitRule(start="^ENCOUNTER_START//IMP$", end="^ENCOUNTER_END//IMP$", key="encounter_id", died=FHIR_DIED),
        )
    ),
    # any contact: also FHIR ambulatory and emergency encounters (where outpatient diagnoses are recorded)
    "any": VisitSet(
        (ADMISSIONS, VisitRule(start="^ENCOUNTER_START//", end="^ENCOUNTER_END//", key="encounter_id", died=FHIR_DIED))
    ),
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
        return self.prediction == "visit_end" and self.offset_hours >= 0


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
        data = expect_mapping(parse_yaml(text, where) or {}, where)
        unknown = sorted(set(data) - {"tasks", "visit_sets", "code_sets"})
        if unknown:
            raise MedstateError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: tasks, visit_sets, code_sets")
        entries = data.get("tasks") or []
        if not isinstance(entries, list) or not entries:
            raise MedstateError(f"{where} defines no tasks (expected a list under tasks:)")
        tasks = tuple(from_data(TaskSpec, t, f"{where}: tasks[{i}]") for i, t in enumerate(entries))
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

    def stays(self, events: pl.DataFrame) -> pl.DataFrame:
        """Every stay of every visit set, unmerged (subject_id, visit_key, start, end, died)."""
        frames = [find_stays(events, s.rules) for s in self.visit_sets.values()]
        return pl.concat(frames).unique(["subject_id", "visit_key"], keep="first").sort("subject_id", "start")


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


def find_stays(events: pl.DataFrame, rules: tuple[VisitRule, ...]) -> pl.DataFrame:
    """(subject_id, visit_key, start, end, died) of every stay the rules find, sorted by subject and start. `died`:
    the end event matches one of the rule's `died` patterns (signals in columns the events lack are ignored)."""
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
        signals = [
            pl.col(column).cast(pl.String).str.contains(pattern).fill_null(False)
            for column, pattern in rule.died.items()
            if column in events.columns
        ]
        died = pl.any_horizontal(*signals) if signals else pl.lit(False)
        ends = (
            keyed.filter(pl.col("code").str.contains(rule.end))
            .with_columns(died.alias("died"))
            .group_by("subject_id", "visit_key")
            .agg(pl.col("time").max().alias("end"), pl.col("died").any())
        )
        frames.append(starts.join(ends, on=["subject_id", "visit_key"]).filter(pl.col("end") >= pl.col("start")))
    if not frames:
        return pl.DataFrame(schema=STAY_SCHEMA)
    return pl.concat(frames).select(STAY_SCHEMA.keys()).cast(STAY_SCHEMA).sort(["subject_id", "start", "visit_key"])


def anchor_visits(events: pl.DataFrame, visit_set: VisitSet = DEFAULT_VISIT_SETS["inpatient"]) -> pl.DataFrame:
    """Episodes (subject_id, visit_key, start, end, died): stays chained while each starts within
    `merge_within_hours` of the running end; died also when MEDS_DEATH is at or before the end of the last day."""
    stays = find_stays(events, visit_set.rules)
    gap = timedelta(hours=visit_set.merge_within_hours)
    running_end = pl.col("end").cum_max().shift(1).over("subject_id")
    episodes = (
        stays.with_columns((running_end.is_null() | (pl.col("start") > running_end + gap)).alias("_new"))
        .with_columns(pl.col("_new").cum_sum().over("subject_id").alias("_episode"))
        .group_by("subject_id", "_episode", maintain_order=True)
        .agg(
            pl.col("visit_key").first(),
            pl.col("start").min(),
            pl.col("end").max(),
            pl.col("died").any(),
        )
    )
    deaths = (
        events.filter((pl.col("code") == DEATH_CODE) & pl.col("time").is_not_null())
        .group_by("subject_id")
        .agg(pl.col("time").min().alias("_death"))
    )
    end_of_day = pl.col("end").dt.truncate("1d") + timedelta(days=1)
    episodes = episodes.join(deaths, on="subject_id", how="left").with_columns(
        (pl.col("died") | (pl.col("_death") < end_of_day).fill_null(False)).alias("died")
    )
    return episodes.select(STAY_SCHEMA.keys()).cast(STAY_SCHEMA).sort(["subject_id", "start", "visit_key"])


def label_task(
    task: TaskSpec, events: pl.DataFrame, visits: pl.DataFrame, code_sets: dict | None = None
) -> pl.DataFrame:
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


def later_stay_keys(stays: pl.DataFrame, labels: pl.DataFrame) -> list[list[str]]:
    """For each label row: the visit keys of the subject's stays that start after its prediction time (their events
    are hidden from the input, whatever their own date)."""
    rows = labels.select("subject_id", "prediction_time").with_row_index("_row")
    joined = rows.join(stays.select("subject_id", "visit_key", "start"), on="subject_id", how="left")
    later = joined.filter(pl.col("start") > pl.col("prediction_time")).group_by("_row").agg(pl.col("visit_key").sort())
    hidden = rows.select("_row").join(later, on="_row", how="left").sort("_row")["visit_key"]
    return [list(keys) if keys is not None else [] for keys in hidden.to_list()]
