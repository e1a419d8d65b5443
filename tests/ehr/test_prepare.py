"""`prepare` on the MIMIC-IV demo: vocabulary from training subjects only, prompted samples, no split crossing."""

import json

import numpy as np
import polars as pl
import pytest

from medstate.data.meds import scan_meds
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.sequences import SPECIAL_TOKENS
from medstate.ehr.tasks import TaskSuite
from medstate.ehr.vocab import Vocabulary
from tests.ehr.conftest import inputs_frame


@pytest.fixture(scope="module")
def prepared(mimic_csv_meds, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare(mimic_csv_meds.summary.output, out, PrepareConfig(max_length=512)), out


def test_files_and_counts(prepared):
    summary, out = prepared
    for name in ("vocab.json", "value_bins.json", "tasks.yaml", "prepare.yaml", "subjects.parquet", "samples.parquet"):
        assert (out / name).is_file(), name
    assert summary.subjects == {"train": 80, "tuning": 10, "held_out": 10}
    labels = pl.read_parquet(out / "labels.parquet")
    finetune = inputs_frame(out, "finetune")
    assert finetune.height == labels.height == sum(s["n"] for s in summary.samples.values())
    assert TaskSuite.load(out / "tasks.yaml").tasks == TaskSuite.load().tasks  # the suite round-trips


def test_prompted_samples(prepared):
    _, out = prepared
    vocab = Vocabulary.load(out / "vocab.json")
    finetune = inputs_frame(out, "finetune")
    assert finetune["input_ids"].list.len().max() <= 512
    for row in finetune.sample(50, seed=0).iter_rows(named=True):
        task_id = vocab.index[f"[TASK_{row['task'].upper()}]"]
        assert row["input_ids"][0] == row["input_ids"][-1] == task_id
        assert row["token_types"][0] == row["token_types"][-1] == 8
        assert len(row["input_ids"]) == len(row["ages"]) == len(row["visit_orders"])


def test_vocabulary_and_bins_come_from_training_subjects_only(prepared, mimic_csv_meds):
    _, out = prepared
    vocab = Vocabulary.load(out / "vocab.json")
    pretrain = inputs_frame(out, "pretrain")
    events = scan_meds(mimic_csv_meds.summary.output).collect()
    train_codes = set(events.filter(pl.col("split") == "train")["code"])
    codes = [t for t in vocab.tokens[len(SPECIAL_TOKENS) :] if not t.startswith("[TASK_")]
    assert codes and all(t.split("//_Q")[0] in train_codes for t in codes)
    others = pretrain.filter(pl.col("split") != "train")["input_ids"].explode()
    assert (others == vocab.unknown_id).sum() > 0  # codes seen only outside training are unknown
    edges = json.loads((out / "value_bins.json").read_text())["edges"]
    assert len(edges) > 100 and all(len(e) == 4 for e in edges.values())


def test_splits_are_kept(prepared):
    _, out = prepared
    pretrain = inputs_frame(out, "pretrain")
    finetune = inputs_frame(out, "finetune")
    split_of = dict(pretrain.select("subject_id", "split").iter_rows())
    assert all(split_of[s] == split for s, split in finetune.select("subject_id", "split").iter_rows())


def test_per_subject_cap_is_label_blind_and_seeded():
    from datetime import datetime, timedelta

    import polars as pl

    from medstate.ehr.tasks import cap_per_subject

    rows = [
        {"subject_id": s, "visit_key": str(v), "prediction_time": datetime(2020, 1, 1) + timedelta(days=v),
         "label": int(v % 4 == 0), "task": task}
        for task in ("onset", "mortality") for s in range(5) for v in range(12)
    ]  # fmt: skip
    labels = pl.DataFrame(rows)
    kept = cap_per_subject(labels, {"onset": 3, "mortality": None}, seed=0)
    per = kept.group_by("task", "subject_id").len()
    assert per.filter(pl.col("task") == "onset")["len"].to_list() == [3] * 5
    assert per.filter(pl.col("task") == "mortality")["len"].to_list() == [12] * 5
    flipped = cap_per_subject(labels.with_columns(1 - pl.col("label")), {"onset": 3, "mortality": None}, seed=0)
    key = ["task", "subject_id", "visit_key"]
    assert kept.select(key).sort(key).equals(flipped.select(key).sort(key))  # the draw never looks at labels
    assert kept.equals(cap_per_subject(labels, {"onset": 3, "mortality": None}, seed=0))
    other = cap_per_subject(labels, {"onset": 3, "mortality": None}, seed=1)
    assert not kept.select(key).sort(key).equals(other.select(key).sort(key))


def test_value_bins_are_the_training_quantiles(prepared, mimic_csv_meds):
    _, out = prepared
    edges = json.loads((out / "value_bins.json").read_text())["edges"]
    events = scan_meds(mimic_csv_meds.summary.output).collect().filter(pl.col("numeric_value").is_not_null())
    code = events.group_by("code").len().sort("len", descending=True)["code"][0]
    values = events.filter(pl.col("code") == code)
    train = values.filter(pl.col("split") == "train")["numeric_value"].to_numpy()
    everyone = values["numeric_value"].to_numpy()
    expected = np.quantile(train, [0.2, 0.4, 0.6, 0.8])  # linear interpolation, the definition of the bins
    assert not np.allclose(expected, np.quantile(everyone, [0.2, 0.4, 0.6, 0.8]))  # the test can tell them apart
    np.testing.assert_allclose(edges[code], expected, rtol=1e-6)


def test_finetune_inputs_are_the_history_known_at_the_prediction_time(prepared, mimic_csv_meds):
    """Recount, for every sample, the events a model may see (written here from the rules in `prepare`'s
    docstring, not through medstate): dated at or before the prediction time (date-only procedures and HCPCS at
    the end of their day), not of a stay admitted after it; static facts always; the stay closed at discharge."""
    _, out = prepared
    events = scan_meds(mimic_csv_meds.summary.output).collect().filter(pl.col("code") != "MEDS_BIRTH")
    date_only = pl.col("code").str.starts_with("PROCEDURE//ICD//") | pl.col("code").str.starts_with("HCPCS//")
    midnight = pl.col("time").dt.hour().eq(0) & pl.col("time").dt.minute().eq(0) & pl.col("time").dt.second().eq(0)
    known = pl.when(date_only & midnight).then(pl.col("time").dt.offset_by("1d") - pl.duration(microseconds=1))
    events = events.with_columns(known.otherwise(pl.col("time")).alias("known"))
    admitted = events.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//")).select(
        "subject_id", "hadm_id", pl.col("time").alias("admitted")
    )
    dated = events.filter(pl.col("time").is_not_null()).join(admitted, on=["subject_id", "hadm_id"], how="left")
    statics = events.filter(pl.col("time").is_null()).group_by("subject_id").len("statics")
    finetune = inputs_frame(out, "finetune").with_row_index("row")
    samples = finetune.select("row", "subject_id", "prediction_time")
    visible = (
        samples.join(dated, on="subject_id")
        .filter(pl.col("known") <= pl.col("prediction_time"))
        .filter(pl.col("admitted").is_null() | (pl.col("admitted") <= pl.col("prediction_time")))
        .group_by("row")
        .len("visible")
    )
    checked = (
        finetune.join(visible, on="row", how="left")
        .join(statics, on="subject_id", how="left")
        .with_columns(
            pl.col("token_types").list.eval((pl.element() == 4).sum()).list.first().alias("event_tokens"),
            pl.col("token_types").list.eval((pl.element() == 2).sum()).list.first().alias("static_tokens"),
            pl.col("input_ids").list.len().alias("length"),
        )
    )
    whole = checked.filter(pl.col("length") < 512)  # not truncated: every visible event is there
    assert whole.height > 200
    assert whole["event_tokens"].to_list() == whole["visible"].to_list()
    assert checked["static_tokens"].to_list() == checked["statics"].to_list()  # kept when truncated too
    truncated = checked.filter(pl.col("length") == 512)
    assert truncated.height > 50 and (truncated["event_tokens"] <= truncated["visible"]).all()
    # discharge-time samples end with the stay closed, as in pretraining; length-of-stay samples stay open
    ends = checked.with_columns(pl.col("token_types").list.slice(-3, 2).alias("last"))
    at_discharge = ends.filter(pl.col("task").is_in(["mortality_30d", "readmission_30d"]))
    assert at_discharge["last"].to_list() == [[5, 6]] * at_discharge.height
    during = ends.filter(pl.col("task") == "los_7d")
    assert all(last[1] != 6 for last in during["last"].to_list())


def test_pretraining_sequences_run_forward_in_time(prepared):
    _, out = prepared
    pretrain = inputs_frame(out, "pretrain")
    for times in pretrain["times"].to_list():
        assert (np.diff(times) >= -1e-3).all()  # float32 days


def test_hand_worked_finetune_inputs(tmp_path):
    """One patient written by hand: what the model sees at discharge and 24 h after admission."""
    from datetime import datetime as t

    rows = [
        (None, "GENDER//F", None),
        (t(2000, 1, 1), "MEDS_BIRTH", None),
        (t(2050, 1, 1, 10), "HOSPITAL_ADMISSION//EW//ER", 1),
        (t(2050, 1, 2, 8), "LAB//A", 1),
        (t(2050, 1, 2), "PROCEDURE//ICD//10//X", 1),  # dated by day: known at the end of 2 January
        (t(2050, 1, 3), "MEDICATION//START//Z", 2),  # an order of the next stay, mis-dated into this one
        (t(2050, 1, 5, 12), "HOSPITAL_DISCHARGE//HOME", 1),
        (t(2050, 1, 7), "MEDICATION//STOP//Y", 1),  # stopped after the discharge
        (t(2050, 1, 20), "HOSPITAL_ADMISSION//EW//ER", 2),
        (t(2050, 1, 30), "HOSPITAL_DISCHARGE//HOME", 2),
    ]
    rows.append((t(2050, 1, 2), "DIAGNOSIS//SNOMED//1", 1))  # a FHIR date without a time: known that evening
    frame = pl.DataFrame(
        [(1, *r) for r in rows],
        schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String, "hadm_id": pl.Int64},
        orient="row",
    ).with_columns(
        pl.lit(None, pl.Float32).alias("numeric_value"),
        pl.when(pl.col("code") == "DIAGNOSIS//SNOMED//1").then(pl.lit("day")).alias("time_precision"),
    )
    (tmp_path / "meds" / "data" / "train").mkdir(parents=True)
    frame.write_parquet(tmp_path / "meds" / "data" / "train" / "0.parquet")
    prepare(tmp_path / "meds", tmp_path / "out", PrepareConfig(max_length=64))
    vocab = Vocabulary.load(tmp_path / "out" / "vocab.json")
    finetune = inputs_frame(tmp_path / "out", "finetune")

    def tokens(task, key):
        row = finetune.filter((pl.col("task") == task) & (pl.col("visit_key") == key))
        return [vocab.tokens[i] for i in row["input_ids"].item()], row["label"].item()

    readmission = "[TASK_READMISSION_30D]"
    assert tokens("readmission_30d", "hadm_id:1") == (
        [readmission, "GENDER//F", "[VS]", "HOSPITAL_ADMISSION//EW//ER", "LAB//A", "PROCEDURE//ICD//10//X",
         "DIAGNOSIS//SNOMED//1", "HOSPITAL_DISCHARGE//HOME", "[VE]", "[REG]", readmission],
        1,
    )  # fmt: skip
    los = "[TASK_LOS_7D]"
    assert tokens("los_7d", "hadm_id:1") == ([los, "GENDER//F", "[VS]", "HOSPITAL_ADMISSION//EW//ER", "LAB//A", los], 0)
