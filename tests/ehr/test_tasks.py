"""Declarative labelers against hand-worked examples, and the three inpatient labels of the MIMIC-IV demo recomputed
in this file from `admissions.csv.gz` and `patients.csv.gz` with plain polars (not through medstate)."""

from datetime import datetime as t
from datetime import timedelta

import polars as pl
import pytest

from medstate import MedstateError
from medstate.data.meds import scan_meds
from medstate.ehr.tasks import TaskSuite
from medstate.ehr.visits import anchor_visits

SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "hadm_id": pl.Int64,
    "encounter_id": pl.String,
    "text_value": pl.String,
}


def events(rows):
    rows = [(*r, None, None)[:6] if len(r) < 6 else r for r in rows]
    return pl.DataFrame(rows, schema=SCHEMA, orient="row")


def stay(subject, hadm, start, end, discharge="HOME"):
    return [
        (subject, start, "HOSPITAL_ADMISSION//EW//ER", hadm),
        (subject, end, f"HOSPITAL_DISCHARGE//{discharge}", hadm),
    ]


EVENTS = events(
    [
        # subject 1: admission 1 (9 days), readmitted 26 days later (admission 2, 1.5 days), dies 30 days after
        *stay(1, 1, t(2100, 1, 1), t(2100, 1, 10)),
        (1, t(2100, 1, 10), "DIAGNOSIS//ICD//10//E785", 1),  # lipid disorder, known at the first discharge
        *stay(1, 2, t(2100, 2, 5), t(2100, 2, 6, 12)),
        (1, t(2100, 2, 6, 12), "DIAGNOSIS//ICD//9//4019", 2),  # hypertension first recorded at the second stay
        (1, t(2100, 3, 8, 12), "MEDS_DEATH", None),  # exactly 30 days after the second discharge
        # subject 2: discharged DIED (the death event itself is missing): an in-hospital death
        *stay(2, 3, t(2100, 1, 1), t(2100, 1, 5), discharge="DIED"),
        # subject 3: dies 30 days and one second after discharge; a stay shorter than 24 h
        *stay(3, 4, t(2100, 1, 1), t(2100, 1, 1, 20)),
        (3, t(2100, 1, 31, 20, 0, 1), "MEDS_DEATH", None),
        # subject 4: discharge dated 00:00, death the same evening (MIMIC-IV writes such stays): in-hospital
        *stay(4, 5, t(2100, 1, 1), t(2100, 1, 9)),
        (4, t(2100, 1, 9, 22), "MEDS_DEATH", None),
        # subject 5: death at the first instant of the day after discharge: after the stay
        *stay(5, 6, t(2100, 1, 1), t(2100, 1, 9, 13)),
        (5, t(2100, 1, 10), "MEDS_DEATH", None),
        # subject 6: readmitted 10 days later; that stay ends in death (a readmission all the same)
        *stay(6, 7, t(2100, 1, 1), t(2100, 1, 5)),
        *stay(6, 8, t(2100, 1, 15), t(2100, 1, 20, 8), discharge="DIED"),
        (6, t(2100, 1, 20, 8), "MEDS_DEATH", None),
        # subjects 7 and 8: back-to-back stays, 0 and 1 minute apart: one episode of 9 days each
        *stay(7, 9, t(2100, 1, 1), t(2100, 1, 3, 10)),
        *stay(7, 10, t(2100, 1, 3, 10), t(2100, 1, 10)),
        *stay(8, 11, t(2100, 1, 1), t(2100, 1, 3, 10)),
        *stay(8, 12, t(2100, 1, 3, 10, 1), t(2100, 1, 10)),
        # subject 9: exactly 7 days (not over 7); next stay 6 h after (same episode), then one 6 h 1 min after
        *stay(9, 13, t(2100, 1, 1), t(2100, 1, 8)),
        *stay(9, 14, t(2100, 1, 8, 6), t(2100, 1, 8, 7)),
        *stay(9, 15, t(2100, 1, 8, 13, 1), t(2100, 1, 9)),
        # subject 10: a FHIR inpatient encounter whose discharge disposition is "exp" (expired)
        (10, t(2100, 1, 1), "ENCOUNTER_START//IMP", None, "e1"),
        (10, t(2100, 1, 4), "ENCOUNTER_END//IMP", None, "e1", "exp"),
        (10, t(2100, 3, 1), "ENCOUNTER_START//IMP", None, "e2"),
        (10, t(2100, 3, 4), "ENCOUNTER_END//IMP", None, "e2", "home"),
    ]
)


def labels(suite, frame=EVENTS):
    table = suite.label(frame)
    return {(r["task"], r["visit_key"]): r["label"] for r in table.iter_rows(named=True)}


def test_hand_made_labels_and_window_edges():
    got = labels(TaskSuite.load())
    by_task = {}
    for (task, key), label in got.items():
        by_task.setdefault(task, {})[key] = label
    assert by_task["mortality_30d"] == {
        "hadm_id:1": 0,
        "hadm_id:2": 1,  # death at discharge + 30 days: inside the window
        "hadm_id:4": 0,  # one second later: outside
        # hadm 3 (discharged DIED), 5 (died the evening of the discharge day), 8 and e1 (died) are left out
        "hadm_id:6": 1,  # died the next day
        "hadm_id:7": 1,  # died 15 days later, in the next stay
        "hadm_id:9": 0,
        "hadm_id:11": 0,
        "hadm_id:13": 0,
        "hadm_id:15": 0,
        "encounter_id:e2": 0,
    }
    assert by_task["readmission_30d"] == {
        "hadm_id:1": 1,
        "hadm_id:2": 0,
        "hadm_id:4": 0,
        "hadm_id:6": 0,
        "hadm_id:7": 1,  # the next stay ends in death: still a readmission
        "hadm_id:9": 0,  # back-to-back stays are one episode: no readmission at 0 minutes ...
        "hadm_id:11": 0,  # ... nor at 1 minute
        "hadm_id:13": 1,  # stays 13 + 14 (6 h apart) are one episode; stay 15 starts 6 h 1 min after its end
        "hadm_id:15": 0,
        "encounter_id:e2": 0,
    }
    assert by_task["los_7d"] == {
        "hadm_id:1": 1,
        "hadm_id:2": 0,
        "hadm_id:3": 0,
        # hadm 4 ended before the 24 h prediction time: left out
        "hadm_id:5": 1,
        "hadm_id:6": 1,
        "hadm_id:7": 0,
        "hadm_id:8": 0,
        "hadm_id:9": 1,  # the episode 9 + 10 lasts 9 days
        "hadm_id:11": 1,
        "hadm_id:13": 1,  # episode 13 + 14: 7 days 7 hours
        # hadm 15 lasts 11 hours: left out
        "encounter_id:e1": 0,
        "encounter_id:e2": 0,
    }
    # every episode followed by another is an onset sample
    followed = {"hadm_id:7": 0, "hadm_id:13": 0, "encounter_id:e1": 0}
    assert by_task["hypertension_onset"] == {"hadm_id:1": 1, **followed}
    assert by_task["fluid_electrolyte_onset"] == {"hadm_id:1": 0, **followed}
    assert by_task["lipid_onset"] == followed  # subject 1's is recorded at the first discharge already


def test_duration_is_strictly_over():
    exactly = events(stay(1, 1, t(2100, 1, 1), t(2100, 1, 8)))
    longer = events(stay(1, 1, t(2100, 1, 1), t(2100, 1, 8, 0, 0, 1)))
    assert labels(TaskSuite.load(), exactly)[("los_7d", "hadm_id:1")] == 0
    assert labels(TaskSuite.load(), longer)[("los_7d", "hadm_id:1")] == 1


def test_prediction_times():
    table = TaskSuite.load().label(EVENTS)
    los = table.filter((pl.col("task") == "los_7d") & (pl.col("visit_key") == "hadm_id:1"))
    assert los["prediction_time"].item() == t(2100, 1, 1) + timedelta(hours=24)
    mortality = table.filter((pl.col("task") == "mortality_30d") & (pl.col("visit_key") == "hadm_id:9"))
    assert mortality["prediction_time"].item() == t(2100, 1, 10)  # the end of the merged episode


def test_a_task_is_added_by_configuration(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text(
        "tasks:\n"
        "  - {name: death_90d, kind: event_within, window_days: 90, codes: ['^MEDS_DEATH$'], visits: strict}\n"
        "  - {name: anemia_onset, kind: onset_next_visit, code_set: anemia, visits: strict}\n"
        # predicted a day after discharge: a stay starting exactly then is not in (t, t + 2 days]
        "  - {name: back_soon, kind: next_visit_within, window_days: 2, offset_hours: 24, visits: strict}\n"
        "visit_sets:\n"
        "  strict: {merge_within_hours: 0, rules: [{start: '^HOSPITAL_ADMISSION//', end: '^HOSPITAL_DISCHARGE//',"
        " key: hadm_id}]}\n"
        "code_sets:\n"
        "  anemia: [{code: 'DIAGNOSIS//ICD//9//4019', match: exact}]\n"
    )
    frame = events(
        [
            *stay(1, 1, t(2100, 1, 1), t(2100, 1, 10)),
            *stay(1, 2, t(2100, 1, 11), t(2100, 1, 12)),  # exactly 24 h after the first discharge
            (1, t(2100, 1, 11, 12), "DIAGNOSIS//ICD//9//4019", 2),
            *stay(1, 3, t(2100, 1, 13, 0, 0, 1), t(2100, 1, 14)),  # 24 h and 1 s after the second
            (1, t(2100, 3, 8, 12), "MEDS_DEATH", None),
        ]
    )
    assert labels(TaskSuite.load(path), frame) == {
        ("death_90d", "hadm_id:1"): 1,  # death on 2100-03-08, 57 days after the first discharge
        ("death_90d", "hadm_id:2"): 1,
        ("death_90d", "hadm_id:3"): 1,
        ("anemia_onset", "hadm_id:1"): 1,
        ("back_soon", "hadm_id:1"): 0,
        ("back_soon", "hadm_id:2"): 1,
        ("back_soon", "hadm_id:3"): 0,
    }
    loaded = TaskSuite.load(path)
    (tmp_path / "again.yaml").write_text(loaded.to_yaml())
    assert TaskSuite.load(tmp_path / "again.yaml") == loaded  # the suite round-trips through its YAML


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tasks:\n  - {name: x, kind: nope}\n", "kind must be one of"),
        ("tasks:\n  - {name: x, kind: event_within, window_days: 3}\n", "needs codes"),
        ("tasks:\n  - {name: x, kind: onset_next_visit, code_set: missing}\n", "unknown code_set"),
        ("tasks:\n  - {name: x, kind: duration_over, duration_days: 3, colour: red}\n", r"tasks\[0\]: unknown key"),
        ("tasks:\n  - {name: x, kind: duration_over, duration_days: many}\n", "duration_days must be"),
        ("tasks: [\n", "not valid YAML"),
        ("- a\n- b\n", "must be a mapping"),
        ("tasks:\n  - {name: x, kind: duration_over, duration_days: 3}\n"
         "visit_sets:\n  v: [{start: a, end: b, key: k, colour: red}]\n", r"visit_sets.v: rules\[0\]: unknown key"),
        ("tasks:\n  - {name: x, kind: duration_over, duration_days: 3}\ncode_sets:\n  c: [{match: exact}]\n",
         r"code_sets.c\[0\]: missing key\(s\) code"),
        ("tasks:\n  - {name: x, kind: event_within, window_days: 3, codes: ['(']}\n", "not a valid regular"),
    ],
)  # fmt: skip
def test_bad_task_files(tmp_path, text, message):
    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(MedstateError, match=message):
        TaskSuite.load(path)


# --- the MIMIC-IV demo, labelled here from the CSVs by the task definitions ------------------------------------


def _csv(root, name):
    return pl.read_csv(root / "hosp" / f"{name}.csv.gz", infer_schema_length=0)


def expected_inpatient_labels(root) -> pl.DataFrame:
    """mortality_30d, readmission_30d and los_7d written from their definitions with plain polars."""
    admissions = _csv(root, "admissions").select(
        pl.col("subject_id").cast(pl.Int64),
        pl.col("hadm_id"),
        pl.col("admittime").str.to_datetime(),
        pl.col("dischtime").str.to_datetime(),
        pl.col("deathtime").str.to_datetime(),
        ((pl.col("hospital_expire_flag") == "1") | (pl.col("discharge_location") == "DIED")).alias("died"),
    )
    patients = _csv(root, "patients").select(
        pl.col("subject_id").cast(pl.Int64), pl.col("dod").str.to_datetime("%Y-%m-%d")
    )
    in_hospital = admissions.group_by("subject_id").agg(pl.col("deathtime").max())
    death = patients.join(in_hospital, on="subject_id", how="left").select(
        "subject_id", pl.coalesce("deathtime", "dod").alias("death")
    )
    rows = []
    for subject, stays in admissions.sort("admittime").group_by("subject_id", maintain_order=True):
        episodes = []
        for s in stays.iter_rows(named=True):
            if episodes and s["admittime"] <= episodes[-1]["end"] + timedelta(hours=6):
                last = episodes[-1]
                last["end"], last["died"] = max(last["end"], s["dischtime"]), last["died"] or s["died"]
            else:
                episode = {"key": s["hadm_id"], "start": s["admittime"], "end": s["dischtime"], "died": s["died"]}
                episodes.append(episode)
        died_at = death.filter(pl.col("subject_id") == subject[0])["death"].item()
        for i, e in enumerate(episodes):
            end_of_day = t(e["end"].year, e["end"].month, e["end"].day) + timedelta(days=1)
            died = e["died"] or (died_at is not None and died_at < end_of_day)
            key = f"hadm_id:{e['key']}"
            los_time = e["start"] + timedelta(hours=24)
            if e["end"] > los_time:
                rows.append((subject[0], key, los_time, int(e["end"] - e["start"] > timedelta(days=7)), "los_7d"))
            if died:
                continue
            window = e["end"] + timedelta(days=30)
            dead = died_at is not None and e["end"] < died_at <= window
            back = any(e["end"] < later["start"] <= window for later in episodes[i + 1 :])
            rows.append((subject[0], key, e["end"], int(dead), "mortality_30d"))
            rows.append((subject[0], key, e["end"], int(back), "readmission_30d"))
    schema = ["subject_id", "visit_key", "prediction_time", "label", "task"]
    return pl.DataFrame(rows, schema=schema, orient="row").sort(schema)


def test_mimic_demo_labels_match_the_definitions(mimic_csv_meds, shared_data):
    events = scan_meds(mimic_csv_meds.summary.output).collect()
    got = (
        TaskSuite.load()
        .label(events)
        .filter(pl.col("task").is_in(["los_7d", "mortality_30d", "readmission_30d"]))
        .with_columns(pl.col("label").cast(pl.Int64))
    )
    expected = expected_inpatient_labels(shared_data / "mimic-iv-demo-2.2")
    key = ["subject_id", "visit_key", "prediction_time", "label", "task"]
    assert got.select(key).sort(key).equals(expected.select(key).sort(key))
    # the audit's cases: four stays discharged at 00:00 and dead that evening are not mortality samples ...
    admissions = _csv(shared_data / "mimic-iv-demo-2.2", "admissions")
    died = admissions.filter(
        pl.col("subject_id").is_in(["10038081", "10037861", "10007818", "10023117"]) & pl.col("deathtime").is_not_null()
    )
    assert died.height == 4 and died["dischtime"].str.slice(11, 4).eq("00:0").all()
    dead_keys = ("hadm_id:" + died["hadm_id"]).to_list()
    assert got.filter(pl.col("visit_key").is_in(dead_keys) & (pl.col("task") != "los_7d")).height == 0
    # ... and the readmission ending in death is counted
    readmission = got.filter((pl.col("task") == "readmission_30d") & (pl.col("visit_key") == "hadm_id:21599196"))
    assert readmission["label"].to_list() == [1]
    assert anchor_visits(events).height == 272  # 275 admissions, three pairs of back-to-back stays merged
