"""`convert`: MIMIC-IV CSV, FHIR R4 or MEDS in; a validated MEDS dataset and its report.json out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from medstate.data import fhir, meds, mimic
from medstate.data.report import ConversionReport
from medstate.data.writer import MedsWriter, WriteSummary, auto_shards
from medstate.errors import MedstateError

FORMATS = ("mimic-iv", "fhir", "meds")
MEDS_BATCH_ROWS = 1 << 20

Progress = Callable[[str, int], None]  # (source, rows just read)


@dataclass
class ConversionResult:
    summary: WriteSummary
    report: ConversionReport


def convert(
    input: str | Path,
    output: str | Path,
    format: str,
    *,
    strict: bool = False,
    shards: int | None = None,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    tables: list[str] | None = None,
    exclude_files: list[str] | None = None,
    overwrite: bool = False,
    workers: int | None = None,
    timezone: str = "UTC",
    progress: Progress | None = None,
) -> ConversionResult:
    """Convert `input` into a MEDS dataset at `output`.

    Lenient (default): bad records are skipped and counted by reason in `output/report.json`. Strict: the first bad
    record raises a MedstateError naming its file and line or record, and nothing is written.
    `tables` chooses MIMIC-IV tables; `exclude_files` leaves out FHIR files by glob pattern on their names;
    `workers` processes sort the shards at the end (default up to 2; 0 sorts in this process, using less memory).
    `timezone` (FHIR): the zone every time is written in; offset-aware times converted, naive ones read as in it."""
    input = Path(input)
    if format not in FORMATS:
        raise MedstateError(f"unknown format {format!r}; choose one of {', '.join(FORMATS)}")
    if not input.exists():
        raise MedstateError(f"input {input} does not exist")
    report = ConversionReport(strict=strict)
    progress = progress or (lambda source, rows: None)
    if format == "mimic-iv":
        specs = mimic.select_tables(tables)
        events = mimic.read_mimic(input, report, specs, on_batch=lambda rows: progress("mimic-iv", rows))
        extras, size = mimic.EXTRA_COLUMNS, mimic.input_bytes(input, specs)
        name, describe_codes, splits = "MIMIC-IV", mimic.code_metadata(input), None
    elif format == "fhir":
        reader = fhir.FhirReader(input, report, progress=progress, exclude_files=exclude_files, timezone=timezone)
        events, extras, size = reader.events(), fhir.EXTRA_COLUMNS, reader.input_bytes
        name, describe_codes, splits = "FHIR", reader.code_metadata, None
    else:
        files = meds.data_files(input)
        extras = _meds_extra_columns(input, files)
        events, size = _read_meds(input, files, report, progress), sum(f.stat().st_size for f in files)
        name, describe_codes, splits = "MEDS", _meds_code_metadata(input), _meds_splits(input)
    writer = MedsWriter(output, report, extras, shards or auto_shards(size), overwrite, workers, input=input)
    try:
        for source, batch in events:
            writer.add(batch, source)
        summary = writer.finish(
            dataset_name=name,
            seed=seed,
            split_fractions=split_fractions,
            code_metadata=describe_codes,
            subject_map=reader.subject_map() if format == "fhir" else None,
            splits=splits,
            time_zone=f"{timezone} (offset-aware times converted, naive ones read as {timezone})"
            if format == "fhir"
            else None,
        )
    except BaseException:
        writer.abort()
        raise
    return ConversionResult(summary=summary, report=report)


# ---------------------------------------------------------------------------------------------------------------
# MEDS in: read as it is (v0.3 and v0.4 layouts, and the older patient_id/timestamp names), re-sharded and checked


def _meds_extra_columns(root: Path, files: list[Path]) -> dict[str, pl.DataType]:
    extras: dict[str, pl.DataType] = {}
    for path in files:
        for column, dtype in meds.scan_meds_file(root, path).collect_schema().items():
            if column not in meds.MEDS_SCHEMA and column != "split":
                extras.setdefault(column, dtype)
    return extras


def _read_meds(root: Path, files: list[Path], report: ConversionReport, progress: Progress) -> Iterator:
    for path in files:
        frame = meds.scan_meds_file(root, path).drop("split")
        rows = frame.select(pl.len()).collect().item()
        source = str(path.relative_to(root))
        for offset in range(0, rows, MEDS_BATCH_ROWS):
            batch = frame.slice(offset, MEDS_BATCH_ROWS).collect().with_row_index("_row", offset)
            report.read(source, batch.height)
            report.counts_conversions(source)
            missing_subject = pl.col("subject_id").is_null()
            for reason, bad in (("missing subject_id", missing_subject),
                                ("missing code", ~missing_subject & pl.col("code").is_null())):  # fmt: skip
                rows = batch.filter(bad)
                if rows.height:
                    report.problem(source, reason, f"{path} row {rows['_row'][0]}", n=rows.height)
            good = batch.drop("_row").drop_nulls(["subject_id", "code"])
            report.converted(source, good.height)
            yield source, good
            progress(source, batch.height)


def _meds_splits(root: Path) -> pl.DataFrame | None:
    """Keep the dataset's own subject splits: metadata/subject_splits.parquet, else the data/<split>/ folders."""
    path = root / "metadata" / "subject_splits.parquet"
    if path.is_file():
        splits = pl.read_parquet(path)
        splits = splits.rename({"patient_id": "subject_id"}) if "patient_id" in splits.columns else splits
        return splits.select(pl.col("subject_id").cast(pl.Int64), pl.col("split").cast(pl.String))
    events = meds.scan_meds(root).select("subject_id", "split").unique().collect()
    return events if (events["split"] != "").all() else None


def _meds_code_metadata(root: Path) -> Callable[[pl.Series], pl.DataFrame] | None:
    path = root / "metadata" / "codes.parquet"
    if not path.is_file():
        return None
    known = pl.read_parquet(path)
    columns = [pl.col("code").cast(pl.String)]
    columns.append(
        pl.col("description").cast(pl.String)
        if "description" in known.columns
        else pl.lit(None, pl.String).alias("description")
    )
    columns.append(
        pl.col("parent_codes").cast(pl.List(pl.String))
        if "parent_codes" in known.columns
        else pl.lit(None, pl.List(pl.String)).alias("parent_codes")
    )
    known = known.select(columns)
    return lambda codes: known.filter(pl.col("code").is_in(codes.implode()))
