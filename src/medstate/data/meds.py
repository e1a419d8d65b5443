"""Reading MEDS datasets (Medical Event Data Standard) as they are, and describing them.

A MEDS dataset is a directory with `data/**/*.parquet` (one row per event: subject_id, time, code,
numeric_value, text_value, plus optional columns) and `metadata/` (codes, subject splits, dataset.json).
Older layouts are read too: `patient_id`/`timestamp` (MEDS <= 0.2) are renamed to `subject_id`/`time`, and a
missing `text_value` column is added as nulls (MEDS 0.3 made it optional). Reading is lazy (polars).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.errors import MedstateError

MEDS_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}
_RENAMES = {"patient_id": "subject_id", "timestamp": "time"}


def data_files(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise MedstateError(f"MEDS dataset directory {root} does not exist")
    files = sorted((root / "data").rglob("*.parquet")) if (root / "data").is_dir() else []
    if not files:
        raise MedstateError(f"{root} has no data/**/*.parquet shards; is it a MEDS dataset?")
    return files


def scan_meds(root: str | Path) -> pl.LazyFrame:
    """All events of a MEDS dataset as one lazy frame in the canonical schema (extra columns kept), with a
    `split` column taken from each shard's directory under data/ (e.g. train, tuning, held_out)."""
    root = Path(root)
    return pl.concat([scan_meds_file(root, path) for path in data_files(root)], how="diagonal_relaxed")


def scan_meds_file(root: Path, path: Path) -> pl.LazyFrame:
    """One shard, normalised: old column names renamed, missing value columns added, MEDS types enforced."""
    frame = pl.scan_parquet(path)
    try:
        schema = frame.collect_schema()
    except pl.exceptions.PolarsError as err:
        raise MedstateError(f"{path} is not a readable parquet file ({str(err).splitlines()[0]})") from None
    names = schema.names()
    frame = frame.rename({old: new for old, new in _RENAMES.items() if old in names and new not in names})
    schema = frame.collect_schema()
    names = schema.names()
    missing = [c for c in ("subject_id", "time", "code") if c not in names]
    if missing:
        raise MedstateError(f"{path} lacks the MEDS column(s) {missing}")
    _check_types(path, schema)
    if "numeric_value" not in names:
        frame = frame.with_columns(pl.lit(None, dtype=pl.Float32).alias("numeric_value"))
    if "text_value" not in names:
        frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias("text_value"))
    parts = path.relative_to(root / "data").parts
    split = parts[0] if len(parts) > 1 else ""
    return frame.with_columns(
        *(pl.col(name).cast(dtype) for name, dtype in MEDS_SCHEMA.items()), pl.lit(split).alias("split")
    )


_TYPE_CHECKS = {
    "subject_id": (lambda t: t.is_integer(), "an integer"),
    "time": (lambda t: t.is_temporal() or t == pl.Null, "a datetime"),
    "code": (lambda t: t in (pl.String, pl.Categorical) or t == pl.Null, "a string"),
    "numeric_value": (lambda t: t.is_numeric() or t == pl.Null, "a number"),
    "text_value": (lambda t: t in (pl.String, pl.Categorical) or t == pl.Null, "a string"),
}


def _check_types(path: Path, schema: pl.Schema) -> None:
    for column, (accepts, wanted) in _TYPE_CHECKS.items():
        if column in schema and not accepts(schema[column]):
            raise MedstateError(f"{path}: column {column!r} is {schema[column]}, expected {wanted}")


@dataclass
class DatasetSummary:
    subjects: int
    events: int
    first_time: object
    last_time: object
    events_per_split: dict[str, int]
    subjects_per_split: dict[str, int]
    top_code_families: list[tuple[str, int]]


def describe(root: str | Path, top: int = 10) -> DatasetSummary:
    """Subjects, events, time span, split sizes and the most frequent code families (text before '//')."""
    events = scan_meds(root)
    totals = events.select(
        pl.col("subject_id").n_unique().alias("subjects"),
        pl.len().alias("events"),
        pl.col("time").min().alias("first"),
        pl.col("time").max().alias("last"),
    ).collect()
    per_split = (
        events.group_by("split").agg(pl.len().alias("events"), pl.col("subject_id").n_unique().alias("subjects"))
    ).collect()
    families = (
        events.group_by(pl.col("code").str.split("//").list.first().alias("family"))
        .len()
        .sort(["len", "family"], descending=[True, False])
        .head(top)
        .collect()
    )
    return DatasetSummary(
        subjects=totals["subjects"][0],
        events=totals["events"][0],
        first_time=totals["first"][0],
        last_time=totals["last"][0],
        events_per_split=dict(zip(per_split["split"], per_split["events"])),
        subjects_per_split=dict(zip(per_split["split"], per_split["subjects"])),
        top_code_families=list(zip(families["family"], families["len"])),
    )
