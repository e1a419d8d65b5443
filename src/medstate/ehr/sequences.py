"""Patient event sequences in the EhrMamba layout, from MEDS events.

One subject becomes

    [CLS] <static facts> [VS] e e e [VE] [REG] [W2] [VS] e e [VE] [REG] [M4] [VS] … [VE] [REG]

with aligned arrays: token type, age at the token (years), time (days since the subject's first dated event),
visit segment (1, 2, 1, 2, … per visit; 0 outside visits) and visit order (1, 2, 3, … per visit; 0 outside).

- Sequences are in time order. A visit is the events sharing a visit key: the `hadm_id` (MIMIC-IV admissions) or
  `encounter_id` (FHIR encounters) column. An event without a key (an ED lab, an outpatient measurement) that falls
  inside a keyed visit's span belongs to that visit; otherwise it joins a visit for its calendar day. Visits whose
  spans overlap or touch become one visit, so visits never interleave and no interval is negative. A visit's
  special tokens take its first event's age and time ([VE] and [REG] its last).
- Between two visits one time-interval token tells the gap from the end of one to the start of the next:
  [W0]-[W3] for 0-6, 7-13, 14-20, 21-27 days; [M1]-[M12] for whole months of 30 days (28 days to 364); [LT] for a
  year or more.
- A numeric value becomes part of its token: `<code>//_Q<k>`, k = 1…5 from the code's quantiles fitted on the
  training split (codes with no numeric values in training keep their bare code).
- MEDS_BIRTH gives the age and is not a token. Static facts (no time, e.g. GENDER//F) follow [CLS].
- `until(t)` is the history known at t: tokens dated at or before t, less the events of stays that start after t
  (`hidden_keys`); with `close=True` a visit still open at t is closed by [VE] [REG] at t, as every visit is in
  pretraining (predictions at discharge). Truncation keeps [CLS], the static facts (and task tokens), then the
  most recent tokens.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
import polars as pl

from medstate.ehr.quantiles import exact_quantiles
from medstate.errors import MedstateError

CLS, VISIT_START, VISIT_END, REGISTER, PAD, UNKNOWN, MASK = "[CLS]", "[VS]", "[VE]", "[REG]", "[PAD]", "[UNK]", "[MASK]"
INTERVAL_TOKENS = [f"[W{w}]" for w in range(4)] + [f"[M{m}]" for m in range(1, 13)] + ["[LT]"]
SPECIAL_TOKENS = [PAD, UNKNOWN, CLS, VISIT_START, VISIT_END, REGISTER, MASK, *INTERVAL_TOKENS]
# where a finetuning input carries its task token: first and last (EhrMamba's prompts), or last only
PROMPT_LAYOUTS = ("both", "last")
BIRTH = "MEDS_BIRTH"
# which column(s) hold the visit key, in order of preference; events with none fall into calendar-day visits
VISIT_KEYS = {
    "auto": ("hadm_id", "encounter_id"),
    "admission": ("hadm_id",),
    "encounter": ("encounter_id",),
    "day": (),
}

# the aligned arrays of a sequence and how they are stored; prepare, batching and the model take the names from here
ARRAY_DTYPES = {
    "input_ids": pl.Int32,
    "token_types": pl.Int8,
    "ages": pl.Float32,
    "times": pl.Float32,
    "visit_segments": pl.Int8,
    "visit_orders": pl.Int32,
}
ARRAYS = tuple(ARRAY_DTYPES)

# token types (an embedding each)
TYPE_PAD, TYPE_CLS, TYPE_STATIC, TYPE_VISIT_START, TYPE_EVENT, TYPE_VISIT_END, TYPE_REGISTER, TYPE_INTERVAL = range(8)
TYPE_TASK = 8
N_TOKEN_TYPES = 9
DAY_SECONDS = 86_400.0
DAY_US = 86_400_000_000
STATIC_TIMESTAMP = np.iinfo(np.int64).min
_EPOCH = datetime(1970, 1, 1)
YEAR_DAYS = 365.25


def interval_token(gap_days: float) -> str:
    """The time-interval token for a gap between two visits (visits never overlap, so a gap is never negative)."""
    if gap_days < 0:
        raise ValueError(f"a gap between visits cannot be negative ({gap_days} days)")
    days = gap_days
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
    visit_keys: list[str | None] = field(default_factory=list)  # an event's own visit key ("hadm_id:7"), else None
    birth: datetime | None = None
    first_time: datetime | None = None

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
            [self.visit_keys[i] for i in keep] if self.visit_keys else [],
            self.birth,
            self.first_time,
        )

    def until(
        self, moment: datetime, hidden_keys=(), close: bool = False, closing: tuple = (VISIT_END, REGISTER)
    ) -> PatientSequence:
        """The tokens known at `moment`: static facts and everything dated at or before it, less the events whose
        visit key is in `hidden_keys` (stays that start after `moment`). A visit left without events goes too.
        `close`: a visit still open at `moment` gets its [VE] [REG] at `moment` (`closing`: those two tokens as
        this sequence writes its tokens, strings or vocabulary ids); otherwise it stays open (no [VE]/[REG] yet).
        The interval token before a visit appears with the visit."""
        kept = self._known(moment, hidden_keys)
        history = self._select(kept)
        return history._closed(moment, closing) if close and self._open_at(kept[-1]) else history

    def known_length(self, moment: datetime, hidden_keys=(), close: bool = False) -> int:
        """len(self.until(moment, hidden_keys, close)), without building it."""
        kept = self._known(moment, hidden_keys)
        return len(kept) + (2 if close and self._open_at(kept[-1]) else 0)

    def _known(self, moment: datetime, hidden_keys) -> np.ndarray:
        """Indices of the tokens `until` keeps (before any closing)."""
        keep = self.timestamps <= _microseconds(moment)
        if len(hidden_keys) and self.visit_keys:
            keep &= ~np.isin(np.asarray(self.visit_keys, dtype=object), list(hidden_keys))
        orders_with_events = np.unique(self.visit_orders[keep & (self.token_types == TYPE_EVENT)])
        empty_visit = (self.visit_orders > 0) & ~np.isin(self.visit_orders, orders_with_events)
        keep &= ~empty_visit
        keep[:-1] &= ~((self.token_types[:-1] == TYPE_INTERVAL) & empty_visit[1:])  # its interval token too
        return np.flatnonzero(keep)

    def _open_at(self, index: int) -> bool:
        """A history ending at token `index` ends inside a visit not yet closed."""
        return bool(self.visit_orders[index] > 0 and self.token_types[index] != TYPE_REGISTER)

    def _closed(self, moment: datetime, closing: tuple) -> PatientSequence:
        """This history with [VE] [REG] at `moment` appended to its open last visit."""
        segment, order = int(self.visit_segments[-1]), int(self.visit_orders[-1])
        age, days = _age(self.birth, moment), _days(self.first_time, moment)
        return PatientSequence(
            self.subject_id,
            [*self.tokens, *closing],
            np.r_[self.token_types, TYPE_VISIT_END, TYPE_REGISTER].astype(np.int8),
            np.r_[self.ages, age, age].astype(np.float32),
            np.r_[self.times, days, days].astype(np.float32),
            np.r_[self.visit_segments, segment, segment].astype(np.int8),
            np.r_[self.visit_orders, order, order].astype(np.int32),
            np.r_[self.timestamps, [_microseconds(moment)] * 2].astype(np.int64),
            [*self.visit_keys, None, None] if self.visit_keys else [],
            self.birth,
            self.first_time,
        )

    def _head(self) -> np.ndarray:
        """Indices of [CLS] and the static facts."""
        return np.flatnonzero(np.isin(self.token_types, (TYPE_CLS, TYPE_STATIC)))

    def truncate(self, max_length: int) -> PatientSequence:
        """Keep [CLS], the static facts and the most recent tokens, `max_length` in all."""
        if len(self) <= max_length:
            return self
        head = self._head()[: max(1, max_length - 1)]
        body = np.setdiff1d(np.arange(len(self)), head)
        return self._select(np.r_[head, body[len(body) - (max_length - len(head)) :]])

    def prompted(self, task_token: str, max_length: int, layout: str = "both") -> PatientSequence:
        """Multitask prompted form: the task token is appended after the last event, where the classifier reads
        it, and (layout `both`, EhrMamba's) also replaces [CLS]; with layout `last` [CLS] stays, so every task's
        input is one shared history plus its own last token (what lets a server keep one state per patient).
        Truncation keeps the static facts and drops the oldest history; the task tokens always stay."""
        if layout not in PROMPT_LAYOUTS:
            raise MedstateError(f"unknown prompt layout {layout!r}; choose one of {', '.join(PROMPT_LAYOUTS)}")
        if max_length < 3:
            raise ValueError("a prompted sequence needs room for two task tokens and one event")
        kept = self.truncate(max_length - 1)
        selected = kept._select(np.r_[np.arange(len(kept)), len(kept) - 1])
        ends = [0, -1] if layout == "both" else [-1]
        for end in ends:
            selected.tokens[end] = task_token
            selected.token_types[end], selected.visit_segments[end], selected.visit_orders[end] = TYPE_TASK, 0, 0
            if selected.visit_keys:
                selected.visit_keys[end] = None
        if layout == "both":  # the first token keeps the age and time of the one after it; the end token the last's
            selected.ages[0], selected.times[0] = selected.ages[1], selected.times[1]
        return selected


def _microseconds(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _age(birth: datetime | None, moment: datetime | None) -> float:
    if birth is None or moment is None:
        return 0.0
    return (moment - birth).total_seconds() / DAY_SECONDS / YEAR_DAYS


def _days(first_time: datetime | None, moment: datetime | None) -> float:
    return 0.0 if first_time is None or moment is None else (moment - first_time).total_seconds() / DAY_SECONDS


@dataclass
class ValueBins:
    """Per-code quantile edges for numeric values (fitted on the training split)."""

    n_bins: int = 5
    edges: dict[str, list[float]] = field(default_factory=dict)

    def fit(
        self, events: pl.DataFrame | pl.LazyFrame, progress: Callable[[int, None], None] | None = None
    ) -> ValueBins:
        """Edges from the (code, numeric_value) columns: exact linear quantiles (polars' and numpy's), found by
        `exact_quantiles` in streaming passes whose memory does not grow with the rows (`progress(passes, None)`)."""
        numeric = events.lazy().filter(pl.col("numeric_value").is_not_null() & pl.col("numeric_value").is_finite())
        quantiles = [q / self.n_bins for q in range(1, self.n_bins)]
        self.edges = exact_quantiles(numeric, "code", "numeric_value", quantiles, progress=progress)
        return self

    def token(self, code: str, value: float | None) -> str:
        edges = self.edges.get(code)
        if edges is None or value is None or not np.isfinite(value):
            return code
        return f"{code}//_Q{bisect.bisect_right(edges, value) + 1}"  # as np.searchsorted(side="right")


def visit_key_columns(visit: str) -> tuple[str, ...]:
    if visit not in VISIT_KEYS:
        raise MedstateError(f"unknown visit definition {visit!r}; choose one of {', '.join(VISIT_KEYS)}")
    return VISIT_KEYS[visit]


def assign_visits(times_us: np.ndarray, keys: list[str | None]) -> np.ndarray:
    """Visit number (0, 1, …, in time order) of each event, from times sorted ascending and visit keys (None: no
    key). Keyed events group by key; an unkeyed event inside a keyed group's span joins it, else its calendar day;
    groups whose spans overlap or touch are one visit."""
    return visit_groups(times_us, keys)[0]


def visit_groups(times_us: np.ndarray, keys: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """`assign_visits`, and which events are grouped by their calendar day (unkeyed, outside every keyed span)."""
    n = len(times_us)
    if n == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    keyed = np.asarray([k is not None for k in keys])
    group_names = np.empty(n, dtype=object)
    if keyed.any():
        key_names = np.asarray(keys, dtype=object)[keyed]
        unique, inverse = np.unique(key_names, return_inverse=True)
        starts = np.full(len(unique), np.iinfo(np.int64).max)
        ends = np.full(len(unique), np.iinfo(np.int64).min)
        np.minimum.at(starts, inverse, times_us[keyed])
        np.maximum.at(ends, inverse, times_us[keyed])
        interval = _merge_spans(starts, ends)  # keyed spans → merged intervals, numbered in time order
        group_names[np.flatnonzero(keyed)] = [f"k{i}" for i in interval[inverse]]
        interval_starts = np.full(interval.max() + 1, np.iinfo(np.int64).max)
        interval_ends = np.full(interval.max() + 1, np.iinfo(np.int64).min)
        np.minimum.at(interval_starts, interval, starts)
        np.maximum.at(interval_ends, interval, ends)
    else:
        interval_starts = interval_ends = np.zeros(0, dtype=np.int64)
    by_day = np.zeros(n, dtype=bool)
    for i in np.flatnonzero(~keyed):
        j = int(np.searchsorted(interval_starts, times_us[i], side="right")) - 1
        inside = j >= 0 and times_us[i] <= interval_ends[j]
        group_names[i] = f"k{j}" if inside else f"d{times_us[i] // DAY_US}"
        by_day[i] = not inside
    unique, inverse = np.unique(group_names.astype(str), return_inverse=True)
    starts = np.full(len(unique), np.iinfo(np.int64).max)
    ends = np.full(len(unique), np.iinfo(np.int64).min)
    np.minimum.at(starts, inverse, times_us)
    np.maximum.at(ends, inverse, times_us)
    return _merge_spans(starts, ends)[inverse], by_day


def _merge_spans(starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For spans [start, end]: the number of the merged interval each belongs to (spans that overlap or touch,
    chained, are one interval), numbered in time order."""
    order = np.argsort(starts, kind="stable")
    number = np.empty(len(starts), dtype=np.int64)
    current, running_end = -1, None
    for index in order:
        if running_end is None or starts[index] > running_end:
            current += 1
            running_end = ends[index]
        else:
            running_end = max(running_end, ends[index])
        number[index] = current
    return number


def build_sequence(subject_id: int, events: pl.DataFrame, bins: ValueBins, visit: str = "auto") -> PatientSequence:
    """One subject's events (any order) → its token sequence. `events` has time, code, numeric_value and the visit
    key columns of `visit` (absent columns and null keys: see the module's visit rules)."""
    key_columns = [c for c in visit_key_columns(visit) if c in events.columns]
    birth = events.filter(pl.col("code") == BIRTH)["time"].min()
    static = events.filter(pl.col("time").is_null() & (pl.col("code") != BIRTH))
    dated = events.filter(pl.col("time").is_not_null() & (pl.col("code") != BIRTH)).with_row_index("_order")
    keys = [pl.lit(f"{c}:") + pl.col(c).cast(pl.String) for c in key_columns]  # null where the key is null
    dated = dated.with_columns((pl.coalesce(*keys) if keys else pl.lit(None, pl.String)).alias("_key"))
    dated = dated.sort(["time", "_order"])
    rows = DatedEvents(dated["time"].to_list(), dated["code"].to_list(), dated["numeric_value"].to_list(),
                       dated["_key"].to_list())  # fmt: skip
    return sequence_of(subject_id, birth, static["code"].to_list(), rows, bins)


@dataclass
class DatedEvents:
    """A subject's dated events in time order (ties in arrival order), with their visit keys ("hadm_id:7"; None:
    no key)."""

    moments: list[datetime]
    codes: list[str]
    values: list[float | None]
    keys: list[str | None]


def sequence_of(
    subject_id: int,
    birth: datetime | None,
    static_codes: list[str],
    dated: DatedEvents,
    bins: ValueBins,
    visit_of: np.ndarray | None = None,
) -> PatientSequence:
    """The token sequence of a subject's birth, static facts (in order) and dated events (in time order);
    `visit_of`: the events' visits when the caller has them (`assign_visits`)."""
    moments, codes, values, event_keys = dated.moments, dated.codes, dated.values, dated.keys
    first_time = moments[0] if moments else None
    if visit_of is None:
        visit_of = assign_visits(np.asarray([_microseconds(m) for m in moments], dtype=np.int64), event_keys)

    tokens: list[str] = [CLS]
    types, times, ages, segments, orders = [TYPE_CLS], [0.0], [_age(birth, first_time)], [0], [0]
    stamps, token_keys = [STATIC_TIMESTAMP], [None]

    def add(token, kind, moment, segment=0, order=0, static=False, key=None):
        stamps.append(STATIC_TIMESTAMP if static else _microseconds(moment))
        tokens.append(token)
        types.append(kind)
        ages.append(_age(birth, moment))
        times.append(_days(first_time, moment))
        segments.append(segment)
        orders.append(order)
        token_keys.append(key)

    for code in static_codes:
        add(code, TYPE_STATIC, first_time, static=True)
    bounds = np.flatnonzero(np.diff(visit_of)) + 1
    previous_end = None
    for order, (lo, hi) in enumerate(zip(np.r_[0, bounds], np.r_[bounds, len(moments)]), start=1):
        if lo == hi:  # no dated events
            break
        start, end = moments[lo], moments[hi - 1]
        segment = 1 if order % 2 else 2
        if previous_end is not None:
            add(interval_token((start - previous_end).total_seconds() / DAY_SECONDS), TYPE_INTERVAL, start)
        add(VISIT_START, TYPE_VISIT_START, start, segment, order)
        for i in range(lo, hi):
            add(bins.token(codes[i], values[i]), TYPE_EVENT, moments[i], segment, order, key=event_keys[i])
        add(VISIT_END, TYPE_VISIT_END, end, segment, order)
        add(REGISTER, TYPE_REGISTER, end, segment, order)
        previous_end = end
    return PatientSequence(
        subject_id=subject_id,
        tokens=tokens,
        token_types=np.asarray(types, dtype=np.int8),
        ages=np.asarray(ages, dtype=np.float32),
        times=np.asarray(times, dtype=np.float32),
        visit_segments=np.asarray(segments, dtype=np.int8),
        visit_orders=np.asarray(orders, dtype=np.int32),
        timestamps=np.asarray(stamps, dtype=np.int64),
        visit_keys=token_keys,
        birth=birth,
        first_time=first_time,
    )


def at_end_of_day(events: pl.DataFrame, date_only_codes: tuple[str, ...]) -> pl.DataFrame:
    """Date-only events moved to the last microsecond of their day: those of `date_only_codes` dated at 00:00, and
    those whose `time_precision` is "day" (FHIR dates without a time), birth excepted (it only gives the age)."""
    matches = pl.any_horizontal(pl.lit(False), *(pl.col("code").str.contains(p) for p in date_only_codes))
    if "time_precision" in events.columns:
        matches = matches | ((pl.col("time_precision") == "day") & (pl.col("code") != "MEDS_BIRTH")).fill_null(False)
    midnight = pl.col("time") == pl.col("time").dt.truncate("1d")
    end_of_day = pl.col("time") + timedelta(days=1) - timedelta(microseconds=1)
    return events.with_columns(pl.when(matches & midnight).then(end_of_day).otherwise(pl.col("time")).alias("time"))
