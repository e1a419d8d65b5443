"""Declarative labelers: window edges, exclusions and leakage, on hand-made events and on the MIMIC-IV demo."""

from datetime import datetime as t
from datetime import timedelta

import polars as pl
import pytest

from medstate import MedstateError
from medstate.data.meds import scan_meds
from medstate.ehr.tasks import TaskSuite, anchor_visits, events_until


def events(rows):
    return pl.DataFrame(
        rows,
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "hadm_id": pl.Int64},
        orient="row",
    )


EVENTS = events(
    [
        # subject 1: admission 1 (9 days), readmitted 26 days later (admission 2, 1.5 days), dies 30 days after
        (1, t(2100, 1, 1), "HOSPITAL_ADMISSION//EW//ER", 1),
        (1, t(2100, 1, 10), "DIAGNOSIS//ICD//10//E785", 1),  # lipid disorder, known at the first discharge
        (1, t(2100, 1, 10), "HOSPITAL_DISCHARGE//HOME", 1),
        (1, t(2100, 2, 5), "HOSPITAL_ADMISSION//EW//ER", 2),
        (1, t(2100, 2, 6, 12), "DIAGNOSIS//ICD//9//4019", 2),  # hypertension first recorded at the second stay
        (1, t(2100, 2, 6, 12), "HOSPITAL_DISCHARGE//HOME", 2),
        (1, t(2100, 3, 8, 12), "MEDS_DEATH", None),  # exactly 30 days after the second discharge
        # subject 2: dies in hospital
        (2, t(2100, 1, 1), "HOSPITAL_ADMISSION//EW//ER", 3),
        (2, t(2100, 1, 5), "MEDS_DEATH", None),
        (2, t(2100, 1, 5), "HOSPITAL_DISCHARGE//DIED", 3),
        # subject 3: dies 30 days and one second after discharge; a stay shorter than 24 h
        (3, t(2100, 1, 1), "HOSPITAL_ADMISSION//EW//ER", 4),
        (3, t(2100, 1, 1, 20), "HOSPITAL_DISCHARGE//HOME", 4),
        (3, t(2100, 1, 31, 20, 0, 1), "MEDS_DEATH", None),
    ]
)


def labels(suite):
    table = suite.label(EVENTS)
    return {(r["task"], r["visit_key"]): r["label"] for r in table.iter_rows(named=True)}


def test_hand_made_labels_and_window_edges():
    got = labels(TaskSuite.load())
    assert got == {
        ("mortality_30d", "hadm_id:1"): 0,
        ("mortality_30d", "hadm_id:2"): 1,  # death at discharge + 30 days: inside the window
        ("mortality_30d", "hadm_id:4"): 0,  # one second later: outside
        # hadm 3 (died in hospital) is left out of mortality and readmission
        ("los_7d", "hadm_id:1"): 1,
        ("los_7d", "hadm_id:2"): 0,
        ("los_7d", "hadm_id:3"): 0,
        # hadm 4 ended before the 24 h prediction time: left out
        ("readmission_30d", "hadm_id:1"): 1,
        ("readmission_30d", "hadm_id:2"): 0,
        ("readmission_30d", "hadm_id:4"): 0,
        ("hypertension_onset", "hadm_id:1"): 1,
        ("fluid_electrolyte_onset", "hadm_id:1"): 0,
        # lipid disorder already recorded at the first discharge: no onset sample
    }


def test_prediction_times():
    table = TaskSuite.load().label(EVENTS)
    los = table.filter((pl.col("task") == "los_7d") & (pl.col("visit_key") == "hadm_id:1"))
    assert los["prediction_time"].item() == t(2100, 1, 1) + timedelta(hours=24)
    mortality = table.filter((pl.col("task") == "mortality_30d") & (pl.col("visit_key") == "hadm_id:1"))
    assert mortality["prediction_time"].item() == t(2100, 1, 10)


def test_a_task_is_added_by_configuration(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(
        "tasks:\n"
        "  - {name: death_90d, kind: event_within, window_days: 90, codes: ['^MEDS_DEATH$']}\n"
        "  - {name: anemia_onset, kind: onset_next_visit, code_set: anemia}\n"
        "code_sets:\n"
        "  anemia: [{code: 'DIAGNOSIS//ICD//9//4019', match: exact}]\n"
    )
    assert labels(TaskSuite.load(path)) == {
        ("death_90d", "hadm_id:1"): 1,  # death on 2100-03-08, 57 days after the first discharge
        ("death_90d", "hadm_id:2"): 1,
        ("death_90d", "hadm_id:4"): 1,
        ("anemia_onset", "hadm_id:1"): 1,
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks:\n  - {name: x, kind: nope}\n", "kind must be one of"),
        ("tasks:\n  - {name: x, kind: event_within, window_days: 3}\n", "needs codes"),
        ("tasks:\n  - {name: x, kind: onset_next_visit, code_set: missing}\n", "unknown code_set"),
        ("tasks:\n  - {name: x, kind: duration_over, duration_days: 3, colour: red}\n", "unknown field"),
        ("tasks: [\n", "not valid YAML"),
    ],
)
def test_bad_task_files(tmp_path, text, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(MedstateError, match=message):
        TaskSuite.load(path)


def test_no_leakage_on_the_mimic_demo(mimic_csv_meds):
    events = scan_meds(mimic_csv_meds.summary.output).collect()
    table = TaskSuite.load().label(events)
    assert set(table["task"]) == {
        "mortality_30d", "los_7d", "readmission_30d", "hypertension_onset", "fluid_electrolyte_onset", "lipid_onset"
    }  # fmt: skip
    visits = anchor_visits(events)
    assert visits.height == 275  # every admission of the demo
    assert table.filter(pl.col("task") == "readmission_30d").height <= 275
    deaths = events.filter(pl.col("code") == "MEDS_DEATH").select("subject_id", pl.col("time").alias("death"))
    for row in table.sample(60, seed=0).iter_rows(named=True):
        seen = events_until(events, row["subject_id"], row["prediction_time"])
        assert seen["time"].drop_nulls().max() <= row["prediction_time"]
    # no sample of mortality or readmission is predicted after the patient's death
    mortality = table.filter(pl.col("task").is_in(["mortality_30d", "readmission_30d"])).join(deaths, on="subject_id")
    assert (mortality["death"] > mortality["prediction_time"]).all()
    positives = table.group_by("task").agg(pl.col("label").sum()).sort("task")
    print(positives)
    assert positives.filter(pl.col("task") == "mortality_30d")["label"].item() > 0
