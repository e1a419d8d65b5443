"""Streaming tokenization: a patient's events, arriving one at a time and in any order, kept as exactly the tokens
`build_sequence` gives for the same events (equal times in arrival order).

The tokens are *committed* up to the open last visit: its [VE] [REG] are added when the next visit starts (or,
for a prediction, on a copy: `closing`). Each `add` returns a `Change`: the committed tokens from `start` on are
replaced by `rows`. For an event in time order that provably leaves every earlier token as it was, the change is
an append computed in constant time (the event's token; or the previous visit's [VE] [REG], the interval token,
[VS] and the event when it opens a visit). Anything else (a late event, a static fact, a birth date, an event
that merges earlier visits, a visit key seen in an earlier visit) rebuilds the tokens from the event log with
`sequence_of` and reports the first token that differs, so a model's state can be replayed from a snapshot taken
before it.

The fast path's conditions, from the visit rules in `ehr.sequences` (V: the last visit, T: the latest time):
- an event at t >= T with a key already in V, or a new key at t == T, joins V, unless V holds day-grouped events
  (unkeyed, outside every keyed span: a keyed span that grows could take some of them and split V);
- an event with a new key at t > T opens a visit;
- an unkeyed event at t == the latest keyed time is inside that key's span (V); else it is grouped by its day:
  with V if that day's group is in V or t == T, a new visit if the day has no group yet and t > T; a day whose
  group lies in an earlier visit would merge visits (rebuild).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np

from medstate.ehr.sequences import (
    BIRTH,
    DAY_SECONDS,
    DAY_US,
    REGISTER,
    TYPE_EVENT,
    TYPE_INTERVAL,
    TYPE_REGISTER,
    TYPE_VISIT_END,
    TYPE_VISIT_START,
    VISIT_END,
    VISIT_START,
    DatedEvents,
    PatientSequence,
    ValueBins,
    _age,
    _days,
    _microseconds,
    interval_token,
    sequence_of,
    visit_groups,
)

Row = tuple[str, int, float, float, int, int]  # token, token type, age, time, visit segment, visit order


@dataclass(frozen=True)
class StreamEvent:
    time: datetime | None  # None: a static fact
    code: str
    numeric_value: float | None = None
    visit_key: str | None = None  # "hadm_id:7" / "encounter_id:…", as build_sequence forms them; None: no key


@dataclass(frozen=True)
class Change:
    start: int  # committed tokens from here on are replaced by `rows` (start == the old length: an append)
    rows: list[Row]
    rebuilt: bool  # False: the constant-time path


def rows_of(sequence: PatientSequence, start: int = 0, stop: int | None = None) -> list[Row]:
    stop = len(sequence) if stop is None else stop
    return [
        (sequence.tokens[i], int(sequence.token_types[i]), float(sequence.ages[i]), float(sequence.times[i]),
         int(sequence.visit_segments[i]), int(sequence.visit_orders[i]))
        for i in range(start, stop)
    ]  # fmt: skip


def _f32(value: float) -> float:
    return float(np.float32(value))


def _segment(order: int) -> int:
    return 1 if order % 2 else 2


@dataclass
class StreamingTokenizer:
    bins: ValueBins
    birth: datetime | None = None
    statics: list[str] = field(default_factory=list)
    # the dated event log in time order (ties: arrival): (time, arrival number, code, value, key)
    log: list[tuple[datetime, int, str, float | None, str | None]] = field(default_factory=list)
    committed: list[Row] = field(default_factory=list)
    arrivals: int = 0
    # what the constant-time path needs to know (recomputed from the log after every rebuild)
    visit: int = 0  # the last visit's order (0: none)
    visit_keys: set[str] = field(default_factory=set)
    visit_has_day_group: bool = False
    keys_seen: set[str] = field(default_factory=set)
    day_visits: dict[int, set[int]] = field(default_factory=dict)  # day → visits holding that day's group
    last_keyed: datetime | None = None

    def __post_init__(self) -> None:
        if not self.committed:
            self._rebuild()

    @classmethod
    def from_events(cls, bins: ValueBins, events: list[StreamEvent]) -> StreamingTokenizer:
        """The tokenizer after `events` (in arrival order), built at once (one rebuild, not one per event)."""
        tokenizer = cls(bins)
        for arrival, event in enumerate(events, 1):
            tokenizer._log_event(event, arrival)
        tokenizer.arrivals = len(events)
        tokenizer._rebuild()
        return tokenizer

    @property
    def first_time(self) -> datetime | None:
        return self.log[0][0] if self.log else None

    @property
    def last_time(self) -> datetime | None:
        return self.log[-1][0] if self.log else None

    def add(self, event: StreamEvent) -> Change:
        self.arrivals += 1
        rows = self._append(event)
        if rows is not None:
            start = len(self.committed)
            self.committed.extend(rows)
            self.log.append((event.time, self.arrivals, event.code, event.numeric_value, event.visit_key))
            return Change(start, rows, rebuilt=False)
        self._log_event(event, self.arrivals)
        old = self.committed
        self._rebuild()
        start = next(
            (i for i, (a, b) in enumerate(zip(old, self.committed)) if a != b), min(len(old), len(self.committed))
        )
        return Change(start, self.committed[start:], rebuilt=True)

    def _log_event(self, event: StreamEvent, arrival: int) -> None:
        if event.code == BIRTH:
            if event.time is not None:
                self.birth = event.time if self.birth is None else min(self.birth, event.time)
        elif event.time is None:
            self.statics.append(event.code)
        else:
            entry = (event.time, arrival, event.code, event.numeric_value, event.visit_key)
            self.log.insert(bisect.bisect(self.log, entry[:2], key=lambda e: e[:2]), entry)

    def closing(self) -> list[Row]:
        """The [VE] [REG] that close the open last visit (at its latest event), as `build_sequence` ends it."""
        if not self.visit:
            return []
        age, time = _f32(_age(self.birth, self.last_time)), _f32(_days(self.first_time, self.last_time))
        segment = _segment(self.visit)
        return [(VISIT_END, TYPE_VISIT_END, age, time, segment, self.visit),
                (REGISTER, TYPE_REGISTER, age, time, segment, self.visit)]  # fmt: skip

    def sequence(self) -> PatientSequence:
        """The whole sequence, every visit closed (what `build_sequence` gives for the events so far)."""
        return sequence_of(0, self.birth, self.statics, self._dated(), self.bins)

    # ----- the constant-time path ----------------------------------------------------------------------------
    def _event_row(self, event: StreamEvent, visit: int) -> Row:
        token = self.bins.token(event.code, event.numeric_value)
        return (token, TYPE_EVENT, _f32(_age(self.birth, event.time)), _f32(_days(self.first_time, event.time)),
                _segment(visit), visit)  # fmt: skip

    def _append(self, event: StreamEvent) -> list[Row] | None:
        """The rows an in-order event appends, with the bookkeeping done; None: rebuild."""
        t, last = event.time, self.last_time
        if t is None or event.code == BIRTH or last is None or t < last:
            return None
        key = event.visit_key
        if key is not None:
            if (key in self.visit_keys or (key not in self.keys_seen and t == last)) and not self.visit_has_day_group:
                joins = True
            elif key not in self.keys_seen and t > last:
                joins = False
            else:
                return None
            self.keys_seen.add(key)
            self.last_keyed = t
        elif self.last_keyed is not None and t == self.last_keyed:
            joins = True  # inside the latest keyed span, which ends at the latest time
        else:
            day = _microseconds(t) // DAY_US
            holders = self.day_visits.get(day, set())
            if holders - {self.visit}:
                return None
            joins = bool(holders) or t == last
        if joins:
            if key is not None:
                self.visit_keys.add(key)
            elif not (self.last_keyed is not None and t == self.last_keyed):
                self.visit_has_day_group = True
                self.day_visits.setdefault(_microseconds(t) // DAY_US, set()).add(self.visit)
            return [self._event_row(event, self.visit)]
        rows = self.closing()
        gap = (t - last).total_seconds() / DAY_SECONDS
        age, time = _f32(_age(self.birth, t)), _f32(_days(self.first_time, t))
        self.visit += 1
        rows += [(interval_token(gap), TYPE_INTERVAL, age, time, 0, 0),
                 (VISIT_START, TYPE_VISIT_START, age, time, _segment(self.visit), self.visit)]  # fmt: skip
        self.visit_keys = {key} if key is not None else set()
        self.visit_has_day_group = key is None
        if key is None:
            self.day_visits.setdefault(_microseconds(t) // DAY_US, set()).add(self.visit)
        return [*rows, self._event_row(event, self.visit)]

    # ----- the rebuild ---------------------------------------------------------------------------------------------
    def _dated(self) -> DatedEvents:
        return DatedEvents([e[0] for e in self.log], [e[2] for e in self.log], [e[3] for e in self.log],
                           [e[4] for e in self.log])  # fmt: skip

    def _rebuild(self) -> None:
        keys = [e[4] for e in self.log]
        visit_of, by_day = visit_groups(np.asarray([_microseconds(e[0]) for e in self.log], dtype=np.int64), keys)
        sequence = sequence_of(0, self.birth, self.statics, self._dated(), self.bins, visit_of)
        self.committed = rows_of(sequence, 0, len(sequence) - (2 if self.log else 0))
        orders = visit_of + 1
        self.visit = int(orders[-1]) if self.log else 0
        last = orders == self.visit
        self.visit_keys = {k for k, in_last in zip(keys, last) if in_last and k is not None}
        self.visit_has_day_group = bool((by_day & last).any())
        self.keys_seen = {k for k in keys if k is not None}
        self.day_visits = {}
        for entry, grouped, order in zip(self.log, by_day, orders):
            if grouped:
                self.day_visits.setdefault(_microseconds(entry[0]) // DAY_US, set()).add(int(order))
        keyed = [e[0] for e in self.log if e[4] is not None]
        self.last_keyed = max(keyed) if keyed else None
