"""MEDS datasets read as they are: the official MIMIC-IV demo shards, older layouts, and bad input."""

from datetime import datetime

import polars as pl
import pytest
from typer.testing import CliRunner

from medstate import MedstateError
from medstate.cli import app
from medstate.data import MEDS_SCHEMA, describe, scan_meds


def test_official_mimic_demo_meds(shared_data):
    root = shared_data / "mimic-iv-demo-meds-0.0.1"
    summary = describe(root)
    # counts from the dataset's SOURCE.md (held_out: 10 subjects / 42,554 events; tuning: 10 / 69,620)
    assert summary.events_per_split == {"held_out": 42554, "tuning": 69620}
    assert summary.subjects_per_split == {"held_out": 10, "tuning": 10}
    assert summary.subjects == 20 and summary.events == 112174
    assert summary.top_code_families[0][0] == "LAB"
    events = scan_meds(root).collect()
    assert {k: events.schema[k] for k in MEDS_SCHEMA} == MEDS_SCHEMA
    assert "hadm_id" in events.columns  # extra columns are kept


def _write(root, frame):
    (root / "data" / "train").mkdir(parents=True)
    frame.write_parquet(root / "data" / "train" / "0.parquet")


def test_older_layout_is_normalised(tmp_path):
    _write(
        tmp_path,
        pl.DataFrame(
            {
                "patient_id": [1, 1, 2],
                "timestamp": [None, datetime(2020, 1, 1), datetime(2021, 5, 2)],
                "code": ["GENDER//F", "DIAGNOSIS//ICD//10//I10", "MEDS_BIRTH"],
                "numeric_value": [None, None, 1.5],
            }
        ),
    )
    events = scan_meds(tmp_path).collect()
    assert events.columns[:5] == list(MEDS_SCHEMA)
    assert events["text_value"].null_count() == 3
    assert events["split"].to_list() == ["train"] * 3
    summary = describe(tmp_path)
    assert (summary.subjects, summary.events) == (2, 3)
    assert summary.first_time == datetime(2020, 1, 1) and summary.last_time == datetime(2021, 5, 2)


def test_bad_input_is_a_user_error(tmp_path):
    with pytest.raises(MedstateError, match="does not exist"):
        describe(tmp_path / "missing")
    with pytest.raises(MedstateError, match=r"no data/\*\*/\*\.parquet"):
        describe(tmp_path)
    _write(tmp_path, pl.DataFrame({"subject_id": [1], "time": [datetime(2020, 1, 1)]}))
    with pytest.raises(MedstateError, match="lacks the MEDS column"):
        describe(tmp_path)
    result = CliRunner().invoke(app, ["data", "describe", str(tmp_path)])
    assert result.exit_code == 2 and "lacks the MEDS column" in result.output
    pl.DataFrame({"subject_id": ["x"], "time": ["not a date"], "code": ["A"]}).write_parquet(
        tmp_path / "data" / "train" / "0.parquet"
    )
    with pytest.raises(MedstateError, match=r"0\.parquet: column 'subject_id' is String, expected an integer"):
        describe(tmp_path)
    (tmp_path / "data" / "train" / "0.parquet").write_bytes(b"not parquet")
    with pytest.raises(MedstateError, match=r"0\.parquet is not a readable parquet file"):
        describe(tmp_path)


def test_cli_describe(shared_data):
    result = CliRunner().invoke(app, ["data", "describe", str(shared_data / "mimic-iv-demo-meds-0.0.1")])
    assert result.exit_code == 0, result.output
    assert "112174" in result.output and "LAB" in result.output


def test_meds_in_meds_out_keeps_rows_and_splits(shared_data, tmp_path):
    from medstate.data.convert import convert

    official = shared_data / "mimic-iv-demo-meds-0.0.1"
    result = convert(official, tmp_path / "out", "meds", shards=3)
    assert result.report.total_skipped == 0
    before = scan_meds(official).collect()
    after = scan_meds(tmp_path / "out").collect()
    key = ["subject_id", "time", "code", "numeric_value", "text_value", "hadm_id"]
    assert after.height == before.height == 112174
    assert before.select(key).sort(key, nulls_last=True).equals(after.select(key).sort(key, nulls_last=True))
    # the official splits are kept, and shards are subject_id % 3
    assert dict(after.select("subject_id", "split").unique().iter_rows()) == dict(
        before.select("subject_id", "split").unique().iter_rows()
    )
    shards = sorted((tmp_path / "out" / "data").rglob("*.parquet"))
    assert shards and {p.name for p in shards} <= {"0.parquet", "1.parquet", "2.parquet"}
    for shard in shards:
        ids = pl.read_parquet(shard)["subject_id"]
        assert (ids % 3 == int(shard.stem)).all(), shard
    codes = pl.read_parquet(tmp_path / "out" / "metadata" / "codes.parquet")
    assert codes.filter(pl.col("code") == "DIAGNOSIS//ICD//9//4280")["description"].item() is not None


def test_old_layout_converts(tmp_path):
    from medstate.data.convert import convert

    old = pl.DataFrame(
        {
            "patient_id": [2, 1, 1],
            "timestamp": [datetime(2000, 1, 2), None, datetime(2000, 1, 1)],
            "code": ["B", "S", "A"],
        }
    )
    _write(tmp_path / "old", old)
    convert(tmp_path / "old", tmp_path / "new", "meds")
    new = scan_meds(tmp_path / "new").collect()
    assert new.select("subject_id", "code").rows() == [(1, "S"), (1, "A"), (2, "B")]
