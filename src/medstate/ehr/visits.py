"""Anchor visits: the stays and episodes that tasks predict at, found by declarative rules.

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

`later_stay_keys` lists, for each sample, the stays that start after its prediction time: their events are hidden
from the input whatever their own date (see `ehr.tasks`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import polars as pl

from medstate.errors import MedstateError
from medstate.loading import compile_pattern

DEATH_CODE = "MEDS_DEATH"
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


def later_stay_keys(stays: pl.DataFrame, labels: pl.DataFrame) -> list[list[str]]:
    """For each label row: the visit keys of the subject's stays that start after its prediction time (their events
    are hidden from the input, whatever their own date)."""
    rows = labels.select("subject_id", "prediction_time").with_row_index("_row")
    joined = rows.join(stays.select("subject_id", "visit_key", "start"), on="subject_id", how="left")
    later = joined.filter(pl.col("start") > pl.col("prediction_time")).group_by("_row").agg(pl.col("visit_key").sort())
    hidden = rows.select("_row").join(later, on="_row", how="left").sort("_row")["visit_key"]
    return [list(keys) if keys is not None else [] for keys in hidden.to_list()]
