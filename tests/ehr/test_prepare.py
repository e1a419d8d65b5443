"""`prepare` on the MIMIC-IV demo: vocabulary from training subjects only, prompted samples, no split crossing."""

import json

import polars as pl
import pytest

from medstate.data.meds import scan_meds
from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.sequences import SPECIAL_TOKENS
from medstate.ehr.tasks import TaskSuite
from medstate.ehr.vocab import Vocabulary


@pytest.fixture(scope="module")
def prepared(mimic_csv_meds, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    return prepare(mimic_csv_meds.summary.output, out, PrepareConfig(max_length=512)), out


def test_files_and_counts(prepared):
    summary, out = prepared
    for name in ("vocab.json", "value_bins.json", "tasks.yaml", "prepare.yaml", "pretrain.parquet", "finetune.parquet"):
        assert (out / name).is_file(), name
    assert summary.subjects == {"train": 80, "tuning": 10, "held_out": 10}
    labels = pl.read_parquet(out / "labels.parquet")
    finetune = pl.read_parquet(out / "finetune.parquet")
    assert finetune.height == labels.height == sum(s["n"] for s in summary.samples.values())
    assert TaskSuite.load(out / "tasks.yaml").tasks == TaskSuite.load().tasks  # the suite round-trips


def test_prompted_samples(prepared):
    _, out = prepared
    vocab = Vocabulary.load(out / "vocab.json")
    finetune = pl.read_parquet(out / "finetune.parquet")
    assert finetune["input_ids"].list.len().max() <= 512
    for row in finetune.sample(50, seed=0).iter_rows(named=True):
        task_id = vocab.index[f"[TASK_{row['task'].upper()}]"]
        assert row["input_ids"][0] == row["input_ids"][-1] == task_id
        assert row["token_types"][0] == row["token_types"][-1] == 8
        assert len(row["input_ids"]) == len(row["ages"]) == len(row["visit_orders"])


def test_vocabulary_and_bins_come_from_training_subjects_only(prepared, mimic_csv_meds):
    _, out = prepared
    vocab = Vocabulary.load(out / "vocab.json")
    pretrain = pl.read_parquet(out / "pretrain.parquet")
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
    pretrain = pl.read_parquet(out / "pretrain.parquet")
    finetune = pl.read_parquet(out / "finetune.parquet")
    split_of = dict(pretrain.select("subject_id", "split").iter_rows())
    assert all(split_of[s] == split for s, split in finetune.select("subject_id", "split").iter_rows())


def test_per_subject_cap_is_label_blind_and_seeded():
    from datetime import datetime, timedelta

    import polars as pl

    from medstate.ehr.prepare import cap_per_subject

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
