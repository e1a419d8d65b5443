"""Patient event sequences in the EhrMamba layout, from MEDS events.

One subject becomes

    [CLS] <static facts> [VS] e e e [VE] [REG] [W2] [VS] e e [VE] [REG] [M4] [VS] … [VE] [REG]

with aligned arrays: token type, age at the token (years), time (days since the subject's first dated event),
visit segment (1, 2, 1, 2, … per visit; 0 outside visits) and visit order (1, 2, 3, … per visit; 0 outside).

- A visit is the events sharing a visit key: the `hadm_id` (MIMIC-IV admissions) or `encounter_id` (FHIR
  encounters) column, or the calendar day. Events without a key (e.g. an outpatient lab) fall into a visit per
  calendar day. Visits are ordered by their first event; a visit's special tokens take its first event's age and
  time ([VE] and [REG] its last).
- Between two visits one time-interval token tells the gap from the end of one to the start of the next:
  [W0]-[W3] for 0-6, 7-13, 14-20, 21-27 days; [M1]-[M12] for whole months of 30 days (28 days to 364); [LT] for a
  year or more.
- A numeric value becomes part of its token: `<code>//_Q<k>`, k = 1…5 from the code's quantiles fitted on the
  training split (codes with no numeric values in training keep their bare code).
- MEDS_BIRTH gives the age and is not a token. Static facts (no time, e.g. GENDER//F) follow [CLS].
- Truncation keeps [CLS] and the most recent tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from medstate.errors import MedstateError

CLS, VISIT_START, VISIT_END, REGISTER, PAD, UNKNOWN, MASK = "[CLS]", "[VS]", "[VE]", "[REG]", "[PAD]", "[UNK]", "[MASK]"
INTERVAL_TOKENS = [f"[W{w}]" for w in range(4)] + [f"[M{m}]" for m in range(1, 13)] + ["[LT]"]
SPECIAL_TOKENS = [PAD, UNKNOWN, CLS, VISIT_START, VISIT_END, REGISTER, MASK, *INTERVAL_TOKENS]
BIRTH = "MEDS_BIRTH"
# which column(s) hold the visit key, in order of preference; events with none fall into calendar-day visits
VISIT_KEYS = {
    "auto": ("hadm_id", "encounter_id"),
    "admission": ("hadm_id",),
    "encounter": ("encounter_id",),
    "day": (),
}

# token types (an embedding each)
TYPE_PAD, TYPE_CLS, TYPE_STATIC, TYPE_VISIT_START, TYPE_EVENT, TYPE_VISIT_END, TYPE_REGISTER, TYPE_INTERVAL = range(8)
TYPE_TASK = 8
N_TOKEN_TYPES = 9
DAY_SECONDS = 86_400.0
STATIC_TIMESTAMP = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1)
YEAR_DAYS = 365.25


def interval_token(gap_days: float) -> str:
    """The time-interval token for a gap between two visits."""
    days = max(0.0, gap_days)
    if days < 28:
        return f"[W{int(days // 7)}]"
    if days < 365:
        return f"[M{min(12, max(1, int(days // 30)))}]"
    return "[LT]"


@dataclass
class PatientSequence:
    subject_id: int
    tokens: list[str]
    token_types: np.ndarray  # int8
    ages: np.ndarray  # float32, years
    times: np.ndarray  # float32, days since the first dated event
    visit_segments: np.ndarray  # int8: 0 outside visits, else 1/2 alternating
    visit_orders: np.ndarray  # int32: 0 outside visits, else 1, 2, …
    timestamps: np.ndarray  # int64 µs since 1970 (the minimum int64 for [CLS] and static facts): for cutting

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def last_time(self) -> datetime | None:
        dated = self.timestamps[self.timestamps != STATIC_TIMESTAMP]
        return None if not len(dated) else _EPOCH + timedelta(microseconds=int(dated.max()))

    def _select(self, keep: np.ndarray) -> PatientSequence:
        return PatientSequence(
            self.subject_id,
            [self.tokens[i] for i in keep],
            self.token_types[keep],
            self.ages[keep],
            self.times[keep],
            self.visit_segments[keep],
            self.visit_orders[keep],
            self.timestamps[keep],
        )

    def until(self, moment: datetime) -> PatientSequence:
        """The tokens known at `moment`: static facts and everything dated at or before it (a visit still in
        progress has no [VE]/[REG] yet; the interval token before a visit appears with the visit)."""
        limit = int((moment - _EPOCH) / timedelta(microseconds=1))
        return self._select(np.flatnonzero(self.timestamps <= limit))

    def prompted(self, task_token: str, max_length: int) -> PatientSequence:
        """Multitask prompted form: the task token replaces [CLS] and is appended after the last event, where the
        classifier reads it. Truncation drops the oldest history; both task tokens always stay."""
        if max_length < 3:
            raise ValueError("a prompted sequence needs room for two task tokens and one event")
        body = np.arange(max(1, len(self) - (max_length - 2)), len(self))
        selected = self._select(np.r_[0, body, len(self) - 1])
        selected.tokens[0] = selected.tokens[-1] = task_token
        for array, value in (
            (selected.token_types, TYPE_TASK),
            (selected.visit_segments, 0),
            (selected.visit_orders, 0),
        ):
            array[0] = array[-1] = value
        selected.ages[0], selected.times[0] = selected.ages[1], selected.times[1]  # the end token keeps the last's
        return selected

    def truncate(self, max_length: int) -> PatientSequence:
        """Keep [CLS] and the most recent `max_length - 1` tokens."""
        if len(self) <= max_length:
            return self
        return self._select(np.r_[0, np.arange(len(self) - max_length + 1, len(self))])


@dataclass
class ValueBins:
    """Per-code quantile edges for numeric values (fitted on the training split)."""

    n_bins: int = 5
    edges: dict[str, list[float]] = field(default_factory=dict)

    def fit(self, events: pl.DataFrame) -> ValueBins:
        numeric = events.filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite())
        quantiles = [q / self.n_bins for q in range(1, self.n_bins)]
        edges = numeric.group_by("code").agg(
            *(pl.col("numeric_value").quantile(q, "linear").alias(f"q{i}") for i, q in enumerate(quantiles))
        )
        self.edges = {row[0]: [float(v) for v in row[1:]] for row in edges.sort("code").iter_rows()}
        return self

    def token(self, code: str, value: float | None) -> str:
        edges = self.edges.get(code)
        if edges is None or value is None or not np.isfinite(value):
            return code
        return f"{code}//_Q{int(np.searchsorted(edges, value, side='right')) + 1}"


def visit_key_columns(visit: str) -> tuple[str, ...]:
    if visit not in VISIT_KEYS:
        raise MedstateError(f"unknown visit definition {visit!r}; choose one of {', '.join(VISIT_KEYS)}")
    return VISIT_KEYS[visit]


def build_sequence(subject_id: int, events: pl.DataFrame, bins: ValueBins, visit: str = "auto") -> PatientSequence:
    """One subject's events (any order) → its token sequence. `events` has time, code, numeric_value and the visit
    key columns of `visit` (absent columns and null keys fall back to the calendar day)."""
    key_columns = [c for c in visit_key_columns(visit) if c in events.columns]
    birth = events.filter(pl.col("code") == BIRTH)["time"].min()
    static = events.filter(pl.col("time").is_null() & (pl.col("code") != BIRTH))
    dated = events.filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH)).with_row_index("_order")
    day_key = pl.lit("day:") + pl.col("time").dt.date().cast(pl.String)
    keys = [pl.lit(f"{c}:") + pl.col(c).cast(pl.String) for c in key_columns]  # null where the key is null
    dated = dated.with_columns(pl.coalesce(*keys, day_key).alias("_visit"))
    dated = dated.sort(["time", "_order"])
    first_time = dated["time"].min() if dated.height else None

    tokens: list[str] = [CLS]
    types, times, ages, segments, orders, stamps = [TYPE_CLS], [0.0], [0.0], [0], [0], [STATIC_TIMESTAMP]

    def age_at(moment: datetime | None) -> float:
        if birth is None or moment is None:
            return 0.0
        return (moment - birth).total_seconds() / DAY_SECONDS / YEAR_DAYS

    def days_at(moment: datetime | None) -> float:
        return 0.0 if first_time is None or moment is None else (moment - first_time).total_seconds() / DAY_SECONDS

    def add(token, kind, moment, segment=0, order=0, static=False):
        stamps.append(STATIC_TIMESTAMP if static else (moment - _EPOCH) // timedelta(microseconds=1))
        tokens.append(token)
        types.append(kind)
        ages.append(age_at(moment))
        times.append(days_at(moment))
        segments.append(segment)
        orders.append(order)

    ages[0] = age_at(first_time)
    for code in static["code"]:
        add(code, TYPE_STATIC, first_time, static=True)
    visits = dated.group_by("_visit", maintain_order=True).agg("time", "code", "numeric_value")
    visits = visits.with_columns(pl.col("time").list.min().alias("_start")).sort("_start", maintain_order=True)
    previous_end = None
    for order, (_, times_in_visit, codes, values, start) in enumerate(visits.iter_rows(), start=1):
        end = max(times_in_visit)
        segment = 1 if order % 2 else 2
        if previous_end is not None:
            add(interval_token((start - previous_end).total_seconds() / DAY_SECONDS), TYPE_INTERVAL, start)
        add(VISIT_START, TYPE_VISIT_START, start, segment, order)
        for moment, code, value in zip(times_in_visit, codes, values):
            add(bins.token(code, value), TYPE_EVENT, moment, segment, order)
        add(VISIT_END, TYPE_VISIT_END, end, segment, order)
        add(REGISTER, TYPE_REGISTER, end, segment, order)
        previous_end = end if previous_end is None else max(previous_end, end)
    return PatientSequence(
        subject_id=subject_id,
        tokens=tokens,
        token_types=np.asarray(types, dtype=np.int8),
        ages=np.asarray(ages, dtype=np.float32),
        times=np.asarray(times, dtype=np.float32),
        visit_segments=np.asarray(segments, dtype=np.int8),
        visit_orders=np.asarray(orders, dtype=np.int32),
        timestamps=np.asarray(stamps, dtype=np.int64),
    )
