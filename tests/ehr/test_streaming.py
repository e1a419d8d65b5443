"""Streaming tokens against `build_sequence` on the same events: after every event of random streams built to hit
the visit rules' corner cases (equal times, unkeyed events beside stays, visits that merge later, late events,
static facts and birth arriving late), and on every subject of the shipped MIMIC-IV demo."""

import random
from datetime import datetime, timedelta

import polars as pl
import pytest

from medstate.ehr.sequences import ValueBins, at_end_of_day, build_sequence
from medstate.ehr.streaming import StreamEvent, StreamingTokenizer, rows_of

DEMO = "data/demo/mimic-iv-demo-meds"
BINS = ValueBins(3, {"LAB//A": [1.0, 2.0]})


def _frame(events: list[StreamEvent]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "time": [e.time for e in events],
            "code": [e.code for e in events],
            "numeric_value": [e.numeric_value for e in events],
            "hadm_id": [None if e.visit_key is None else int(e.visit_key.split(":")[1]) for e in events],
        },
        schema={"time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64, "hadm_id": pl.Int64},
    )


def _expected(events, bins=BINS):
    return rows_of(build_sequence(1, _frame(events), bins))


def _random_stream(rng: random.Random, n: int, late: float) -> list[StreamEvent]:
    start = datetime(2040, 3, 1)
    clock = start
    events = []
    for _ in range(n):
        roll = rng.random()
        if roll < 0.03:
            events.append(StreamEvent(None, rng.choice(["GENDER//F", "RACE//X"])))
            continue
        if roll < 0.05:
            events.append(StreamEvent(datetime(1990, 1, 1) + timedelta(days=rng.randrange(400)), "MEDS_BIRTH"))
            continue
        step = rng.choice([0, 0, 1, 2, 5, 60, 600, 1440, 1440 * 9, 1440 * 40])  # minutes: ties, same day, far
        clock = clock + timedelta(minutes=step)
        moment = clock - timedelta(minutes=rng.choice([1, 30, 300, 3000])) if rng.random() < late else clock
        key = rng.choice([None, None, f"hadm_id:{rng.randrange(1, 6)}"])
        code = rng.choice(["LAB//A", "LAB//B", "DX//1", "RX//2"])
        value = rng.choice([None, 0.5, 1.5, 3.0]) if code == "LAB//A" else None
        events.append(StreamEvent(moment, code, value, key))
    return events


@pytest.mark.parametrize("late", [0.0, 0.15])
def test_tokens_equal_build_sequence_after_every_event(late):
    rebuilt = appended = 0
    for seed in range(40):
        events = _random_stream(random.Random(seed), 60, late)
        tokenizer = StreamingTokenizer(BINS)
        for i, event in enumerate(events, 1):
            before = list(tokenizer.committed)
            change = tokenizer.add(event)
            assert tokenizer.committed == before[: change.start] + change.rows  # what the change says happened
            assert tokenizer.committed + tokenizer.closing() == _expected(events[:i]), (seed, i, event)
            rebuilt, appended = rebuilt + change.rebuilt, appended + (not change.rebuilt)
    assert appended > 1000 and rebuilt > 300  # both paths are exercised (keys recur here often: merges)


def test_visit_merges_and_splits_are_rebuilt():
    t = datetime(2040, 1, 1)
    h = timedelta(hours=1)
    cases = [
        # an unkeyed event at 8:00, a stay at 10:00, another unkeyed at 12:00 the same day: the day's group spans
        # the stay, so all three are one visit
        [StreamEvent(t + 8 * h, "A"), StreamEvent(t + 10 * h, "B", None, "hadm_id:1"), StreamEvent(t + 12 * h, "C")],
        # a stay's key seen again after another visit: the stay spans it, one visit
        [
            StreamEvent(t, "A", None, "hadm_id:1"),
            StreamEvent(t + 50 * h, "B", None, "hadm_id:2"),
            StreamEvent(t + 100 * h, "C", None, "hadm_id:1"),
        ],
        # a keyed span that grows takes an unkeyed event from its day's group and splits the visit
        [
            StreamEvent(t + 8 * h, "A"),
            StreamEvent(t + 10 * h, "B", None, "hadm_id:1"),
            StreamEvent(t + 12 * h, "C"),
            StreamEvent(t + 14 * h, "D", None, "hadm_id:1"),
        ],
    ]
    for events in cases:
        tokenizer = StreamingTokenizer(BINS)
        changes = [tokenizer.add(e) for e in events]
        assert tokenizer.committed + tokenizer.closing() == _expected(events)
        assert changes[-1].rebuilt and changes[-1].start < len(tokenizer.committed)


@pytest.fixture(scope="module")
def demo_events():
    from medstate.data.meds import scan_meds

    events = at_end_of_day(scan_meds(DEMO).collect(), ("^PROCEDURE//ICD//", "^HCPCS//"))
    return events.select("subject_id", "time", "code", "numeric_value", "hadm_id")


def _stream(frame: pl.DataFrame) -> list[StreamEvent]:
    return [
        StreamEvent(time, code, value, None if hadm is None else f"hadm_id:{hadm}")
        for time, code, value, hadm in frame.select("time", "code", "numeric_value", "hadm_id").iter_rows()
    ]


def test_every_demo_subject_streams_to_its_sequence(demo_events):
    """Each subject's events in time order (equal times in file order), as a feed delivers them; the same tokens
    as `build_sequence` on the subject's events, and the rebuilds few."""
    bins = ValueBins(5).fit(demo_events)
    subjects = demo_events.partition_by("subject_id", maintain_order=True)
    assert len(subjects) == 100
    rebuilds = events = 0
    for frame in subjects:
        ordered = frame.with_row_index("_order").sort("time", "_order", nulls_last=False).drop("_order")
        tokenizer = StreamingTokenizer(bins)
        for event in _stream(ordered):
            rebuilds += tokenizer.add(event).rebuilt
        events += ordered.height
        expected = build_sequence(1, ordered, bins)
        assert tokenizer.committed + tokenizer.closing() == rows_of(expected)
    assert events == 264_630 - 0 and rebuilds < 0.02 * events
