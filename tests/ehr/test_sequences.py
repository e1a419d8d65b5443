"""Patient sequences against a hand-worked example: tokens, interval tokens, value bins and aligned arrays."""

from datetime import datetime as t

import numpy as np
import polars as pl
import pytest

from medstate.ehr import ValueBins, Vocabulary, build_sequence, interval_token
from medstate.ehr.sequences import (
    SPECIAL_TOKENS,
    TYPE_CLS,
    TYPE_EVENT,
    TYPE_INTERVAL,
    TYPE_REGISTER,
    TYPE_STATIC,
    TYPE_VISIT_END,
    TYPE_VISIT_START,
)


def events(rows):
    return pl.DataFrame(
        rows,
        schema={"time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float32, "hadm_id": pl.Int64},
        orient="row",
    )


PATIENT = events(
    [
        (t(2050, 6, 1), "DIAGNOSIS//X", None, 22),  # rows in any order
        (None, "GENDER//F", None, None),
        (t(2000, 1, 1), "MEDS_BIRTH", None, None),
        (t(2050, 1, 1, 10), "HOSPITAL_ADMISSION", None, 11),
        (t(2050, 1, 1, 12), "LAB//A", 5.0, 11),
        (t(2050, 1, 3, 8), "HOSPITAL_DISCHARGE", None, 11),
        (t(2050, 1, 20, 9), "LAB//A", 1.0, None),  # no admission: a visit for the calendar day
        (t(2050, 1, 20, 10), "LAB//B", None, None),
        (t(2052, 1, 1), "LAB//B", None, None),
    ]
)
TRAIN_VALUES = events([(t(2050, 1, 1), "LAB//A", v, None) for v in (5.0, 1.0, 3.0, 7.0, 9.0)])


def test_hand_worked_sequence():
    bins = ValueBins(5).fit(TRAIN_VALUES)
    # linear quantiles of 1, 3, 5, 7, 9 at 0.2, 0.4, 0.6, 0.8
    assert bins.edges == {"LAB//A": pytest.approx([2.6, 4.2, 5.8, 7.4])}
    sequence = build_sequence(7, PATIENT, bins, visit="admission")
    assert sequence.tokens == [
        "[CLS]", "GENDER//F",
        "[VS]", "HOSPITAL_ADMISSION", "LAB//A//_Q3", "HOSPITAL_DISCHARGE", "[VE]", "[REG]",
        "[W2]",  # 16 days 23 h from the discharge to the next visit
        "[VS]", "LAB//A//_Q1", "LAB//B", "[VE]", "[REG]",
        "[M4]",  # 131.6 days
        "[VS]", "DIAGNOSIS//X", "[VE]", "[REG]",
        "[LT]",  # 1.6 years
        "[VS]", "LAB//B", "[VE]", "[REG]",
    ]  # fmt: skip
    S, V, E, VE, R, I = TYPE_STATIC, TYPE_VISIT_START, TYPE_EVENT, TYPE_VISIT_END, TYPE_REGISTER, TYPE_INTERVAL
    assert sequence.token_types.tolist() == [
        TYPE_CLS,
        S,
        V,
        E,
        E,
        E,
        VE,
        R,
        I,
        V,
        E,
        E,
        VE,
        R,
        I,
        V,
        E,
        VE,
        R,
        I,
        V,
        E,
        VE,
        R,
    ]
    assert sequence.visit_segments.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0, 1, 1, 1, 1, 0, 2, 2, 2, 2]
    assert sequence.visit_orders.tolist() == [0, 0, 1, 1, 1, 1, 1, 1, 0, 2, 2, 2, 2, 2, 0, 3, 3, 3, 3, 0, 4, 4, 4, 4]
    first = t(2050, 1, 1, 10)
    days = lambda moment: (moment - first).total_seconds() / 86400  # noqa: E731
    expected_times = [0, 0, 0, 0, days(t(2050, 1, 1, 12)), days(t(2050, 1, 3, 8)), days(t(2050, 1, 3, 8))]
    np.testing.assert_allclose(sequence.times[:7], expected_times, atol=1e-4)
    np.testing.assert_allclose(sequence.times[8], days(t(2050, 1, 20, 9)), atol=1e-4)  # interval: next visit start
    age = lambda moment: (moment - t(2000, 1, 1)).total_seconds() / 86400 / 365.25  # noqa: E731
    np.testing.assert_allclose(sequence.ages[2], age(first), atol=1e-4)
    np.testing.assert_allclose(sequence.ages[-1], age(t(2052, 1, 1)), atol=1e-4)
    assert sequence.last_time == t(2052, 1, 1)


def test_day_visits_ignore_admissions():
    sequence = build_sequence(7, PATIENT, ValueBins(5), visit="day")
    # 2050-01-01, 2050-01-03, 2050-01-20, 2050-06-01, 2052-01-01; no bins fitted: bare codes
    assert sequence.tokens.count("[VS]") == 5
    assert "LAB//A" in sequence.tokens and "[W2]" in sequence.tokens


@pytest.mark.parametrize(
    ("days", "token"),
    [(0, "[W0]"), (6.99, "[W0]"), (7, "[W1]"), (20.9, "[W2]"), (27.9, "[W3]"), (28, "[M1]"), (59.9, "[M1]"),
     (60, "[M2]"), (364.9, "[M12]"), (365, "[LT]")],
)  # fmt: skip
def test_interval_tokens(days, token):
    assert interval_token(days) == token


def test_a_negative_gap_is_an_error_not_w0():
    with pytest.raises(ValueError, match="negative"):
        interval_token(-0.01)


def test_truncation_keeps_cls_static_facts_and_the_most_recent_tokens():
    sequence = build_sequence(7, PATIENT, ValueBins(5).fit(TRAIN_VALUES))
    short = sequence.truncate(6)
    assert short.tokens == ["[CLS]", "GENDER//F", "[VS]", "LAB//B", "[VE]", "[REG]"]
    assert short.visit_orders.tolist() == [0, 0, 4, 4, 4, 4] and len(short.ages) == 6
    assert sequence.truncate(100) is sequence


def test_vocabulary(tmp_path):
    vocab = Vocabulary.fit([["A", "B", "B"], ["B", "C"]], min_count=2, task_tokens=["[TASK_MORTALITY]"])
    assert vocab.tokens[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS
    assert vocab.tokens[len(SPECIAL_TOKENS) :] == ["[TASK_MORTALITY]", "B"]
    assert vocab.encode(["B", "A"]) == [vocab.index["B"], vocab.unknown_id]
    vocab.save(tmp_path / "vocab.json")
    assert Vocabulary.load(tmp_path / "vocab.json").tokens == vocab.tokens


def test_until_cuts_at_the_prediction_time():
    sequence = build_sequence(7, PATIENT, ValueBins(5))
    during = sequence.until(t(2050, 1, 2))  # inside the first admission: no [VE]/[REG] yet
    assert during.tokens == ["[CLS]", "GENDER//F", "[VS]", "HOSPITAL_ADMISSION", "LAB//A"]
    after = sequence.until(t(2050, 1, 20, 9))  # the interval token arrives with the next visit
    assert after.tokens[-4:] == ["[REG]", "[W2]", "[VS]", "LAB//A"]
    assert after.last_time == t(2050, 1, 20, 9)


def test_prompted_task_tokens_survive_truncation():
    sequence = build_sequence(7, PATIENT, ValueBins(5))
    prompted = sequence.prompted("[TASK_X]", 6)
    assert prompted.tokens == ["[TASK_X]", "GENDER//F", "LAB//B", "[VE]", "[REG]", "[TASK_X]"]
    assert prompted.token_types[0] == prompted.token_types[-1] == 8
    assert len(prompted) == 6 and prompted.ages[-1] == prompted.ages[-2]
    whole = sequence.prompted("[TASK_X]", 1000)
    assert whole.tokens[0] == whole.tokens[-1] == "[TASK_X]" and whole.tokens[1:-1] == sequence.tokens[1:]
    last = sequence.prompted("[TASK_X]", 6, "last")  # [CLS] stays: one history shared by every task
    assert last.tokens == ["[CLS]", "GENDER//F", "LAB//B", "[VE]", "[REG]", "[TASK_X]"]
    assert list(last.token_types[[0, -1]]) == [1, 8] and last.ages[0] == sequence.ages[0]


# time order: unkeyed events inside a stay, overlapping stays, and the history known at a prediction time

OVERLAPPING = events(
    [
        (t(2000, 1, 1), "MEDS_BIRTH", None, None),
        (t(2050, 1, 1, 10), "HOSPITAL_ADMISSION", None, 1),
        (t(2050, 1, 1, 9), "LAB//ED", None, None),  # before the stay: a visit of its own day
        (t(2050, 1, 2, 8), "LAB//A", None, None),  # no key, inside stay 1: belongs to it
        (t(2050, 1, 1, 10, 30), "LAB//E", None, None),  # so does this one, although LAB//ED's day is the same
        (t(2050, 1, 3, 8), "HOSPITAL_DISCHARGE", None, 1),
        (t(2050, 1, 3, 6), "ED_REGISTRATION", None, 2),  # the next stay registers before this discharge
        (t(2050, 1, 3, 12), "HOSPITAL_ADMISSION", None, 2),
        (t(2050, 1, 5), "HOSPITAL_DISCHARGE", None, 2),
        (t(2050, 1, 9), "MEDICATION//STOP", None, 2),  # stopped days after the discharge
        (t(2050, 1, 7), "LAB//B", None, None),  # no key, inside stay 2's span (up to the medication stop)
        (t(2050, 2, 1), "LAB//C", None, None),
    ]
)


def test_sequences_are_in_time_order_with_unkeyed_events_in_their_stay():
    sequence = build_sequence(7, OVERLAPPING, ValueBins(5), visit="admission")
    assert sequence.tokens == [
        "[CLS]",
        "[VS]", "LAB//ED", "[VE]", "[REG]",
        "[W0]",  # 1 hour later
        # stays 1 and 2 overlap (registration at 06:00 before the 08:00 discharge): one visit, in time order
        "[VS]", "HOSPITAL_ADMISSION", "LAB//E", "LAB//A", "ED_REGISTRATION", "HOSPITAL_DISCHARGE", "HOSPITAL_ADMISSION",
        "HOSPITAL_DISCHARGE", "LAB//B", "MEDICATION//STOP", "[VE]", "[REG]",
        "[W3]",  # 23 days from the medication stop
        "[VS]", "LAB//C", "[VE]", "[REG]",
    ]  # fmt: skip
    dated = sequence.timestamps[sequence.timestamps != np.iinfo(np.int64).min]
    assert (np.diff(dated) >= 0).all() and (np.diff(sequence.times) >= 0).all()


def test_history_hides_later_stays_and_closes_the_current_one():
    sequence = build_sequence(7, OVERLAPPING, ValueBins(5), visit="admission")
    discharge = t(2050, 1, 3, 8)
    # stay 2 starts after stay 1's discharge: its registration (dated before) is hidden
    history = sequence.until(discharge, hidden_keys=["hadm_id:2"], close=True)
    assert history.tokens == [
        "[CLS]", "[VS]", "LAB//ED", "[VE]", "[REG]", "[W0]",
        "[VS]", "HOSPITAL_ADMISSION", "LAB//E", "LAB//A", "HOSPITAL_DISCHARGE", "[VE]", "[REG]",
    ]  # fmt: skip
    assert history.timestamps[-1] == history.timestamps[-3]  # closed at the prediction time
    age = (discharge - t(2000, 1, 1)).total_seconds() / 86400 / 365.25
    np.testing.assert_allclose(history.ages[-2:], [age, age], rtol=1e-6)
    assert history.visit_orders[-1] == history.visit_orders[-3] == 2
    opened = sequence.until(discharge, hidden_keys=["hadm_id:2"])
    assert opened.tokens[-1] == "HOSPITAL_DISCHARGE"  # left open unless asked
    shown = sequence.until(discharge)
    assert "ED_REGISTRATION" in shown.tokens  # what a cut by time alone would let through
    # a visit whose only events are hidden disappears with its interval token
    alone = build_sequence(7, events([(t(2050, 1, 1), "A", None, 1), (t(2050, 1, 5), "B", None, 2),
                                      (t(2050, 1, 9), "C", None, 3)]), ValueBins(5), visit="admission")  # fmt: skip
    assert alone.until(t(2050, 1, 6)).tokens[-5:] == ["[W0]", "[VS]", "B", "[VE]", "[REG]"]
    assert alone.until(t(2050, 1, 6), hidden_keys=["hadm_id:2"]).tokens == ["[CLS]", "[VS]", "A", "[VE]", "[REG]"]


def test_a_value_on_an_edge_takes_the_bin_above():
    from medstate.ehr.sequences import ValueBins

    bins = ValueBins(5, {"LAB//A": [1.0, 2.0, 3.0, 4.0]})
    cases = {0.5: "_Q1", 1.0: "_Q2", 2.0: "_Q3", 2.5: "_Q3", 4.0: "_Q5", 9.0: "_Q5"}  # bin k: edge[k-1] <= v < edge[k]
    assert {v: bins.token("LAB//A", v).split("//")[-1] for v in cases} == cases
    assert bins.token("LAB//A", float("nan")) == bins.token("LAB//A", None) == "LAB//A"
    assert bins.token("LAB//B", 2.0) == "LAB//B"  # no edges: the bare code
