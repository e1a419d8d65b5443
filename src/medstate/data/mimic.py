"""MIMIC-IV v2.x CSV tables → MEDS events, following the conventions of the official MIMIC-IV MEDS ETL.

Each table is described as data (`data.mimic_tables.TABLES`): which events a row yields, how each event's code is
assembled, which column gives its time, value and extra columns. Tables stream in batches (`csv_stream`), so memory
stays bounded by the batch and the admissions lookup.
Beyond the official ETL's tables, `prescriptions` (MEDICATION//PRESCRIPTION//<drug>) and `procedureevents`
(PROCEDURE//START|END//<itemid>) are read too, as the issue asks; pass `tables=` to choose.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from medstate.data.csv_stream import TRUNCATED, csv_columns, stream_csv
from medstate.data.mimic_tables import (
    EXTRA_COLUMNS,
    MISSING_PART,
    TABLE_NAMES,
    TABLES,
    Admissions,
    EventSpec,
    TableSpec,
    parse_times,
)
from medstate.data.report import ConversionReport
from medstate.errors import MedstateError


def find_table(root: Path, path: str) -> Path | None:
    for suffix in (".csv.gz", ".csv"):
        candidate = root / f"{path}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def input_bytes(root: Path, tables: tuple[TableSpec, ...] = TABLES) -> int:
    return sum(p.stat().st_size for t in tables if (p := find_table(Path(root), t.path)))


def select_tables(names: list[str] | None) -> tuple[TableSpec, ...]:
    if not names:
        return TABLES
    unknown = sorted(set(names) - set(TABLE_NAMES))
    if unknown:
        raise MedstateError(f"unknown MIMIC-IV table(s) {unknown}; known: {', '.join(TABLE_NAMES)}")
    return tuple(t for t in TABLES if t.name in names)


def read_mimic(
    root: str | Path,
    report: ConversionReport,
    tables: tuple[TableSpec, ...] = TABLES,
    on_batch: Callable[[int], None] | None = None,
):
    """Yield (source, events) per batch: events are MEDS columns plus the table's extra columns.

    `on_batch(rows)` is called after each batch (for progress)."""
    root = Path(root)
    present = {t.path: find_table(root, t.path) for t in tables}
    if not any(present.values()):
        raise MedstateError(
            f"no MIMIC-IV tables under {root} (expected e.g. hosp/patients.csv.gz and icu/icustays.csv.gz)"
        )
    admissions = _load_admissions(root, report)
    for table in tables:
        path = present[table.path]
        if path is None:
            report.note(f"{table.path}: not present, skipped")
            continue
        if not _has_columns(path, table, report):
            continue
        report.counts_conversions(table.name)
        for batch in stream_csv(path, table.source_columns(), table.name, report):
            report.read(table.name, batch.frame.height)
            yield from _events_of_batch(table, batch.frame, batch.first_line, path, admissions, report)
            if on_batch:
                on_batch(batch.frame.height)


def _load_admissions(root: Path, report: ConversionReport) -> Admissions:
    path = find_table(root, "hosp/admissions")
    columns = ["subject_id", "hadm_id", "dischtime", "deathtime"]
    if path is None or not set(columns) <= set(csv_columns(path)):
        report.note("hosp/admissions absent or incomplete: diagnoses and DRGs get no time, deaths use dod only")
        return Admissions(pl.DataFrame({c: [] for c in columns}, schema=dict.fromkeys(columns, pl.String)))
    silent = ConversionReport(strict=False)  # problems in admissions are counted when the table itself is read
    frames = [b.frame for b in stream_csv(path, columns, "admissions", silent)]
    return Admissions(pl.concat(frames) if frames else pl.DataFrame(schema=dict.fromkeys(columns, pl.String)))


def _has_columns(path: Path, table: TableSpec, report: ConversionReport) -> bool:
    try:
        header = csv_columns(path)
    except (OSError, EOFError, ValueError) as err:
        report.lost_file(path, f"{TRUNCATED}: {str(err).splitlines()[0] if str(err) else type(err).__name__}", 0)
        return False
    missing = [c for c in table.source_columns() if c not in header]
    if missing:
        rows = sum(b.frame.height for b in stream_csv(path, [header[0]], table.name, ConversionReport()))
        report.read(table.name, rows)
        report.counts_conversions(table.name)
        report.problem(
            table.name, f"table skipped: missing column(s) {missing}", f"{path}: missing column(s) {missing}", n=rows
        )
        return False
    return True


def _code_part(part: str) -> pl.Expr:
    if not part.startswith("$"):
        return pl.lit(part)
    # verbatim, like the official ETL (a lone space stays a space); only an empty field becomes UNK
    return pl.col(part[1:]).fill_null(MISSING_PART)


def _events_of_batch(
    table: TableSpec, frame: pl.DataFrame, first_line: int, path: Path, admissions: Admissions, report: ConversionReport
):
    source = table.name
    frame = frame.with_row_index("_row")
    subject = pl.col("subject_id").str.strip_chars().cast(pl.Int64, strict=False)
    frame = frame.with_columns(subject.alias("_subject"))
    bad_subject = pl.col("_subject").is_null()
    _count(report, source, frame, [(bad_subject, "subject_id missing or not an integer", "subject_id", False)],
           first_line, path)  # fmt: skip
    frame = frame.filter(~bad_subject).drop("subject_id").rename({"_subject": "subject_id"})
    if table.derive is not None:
        frame = table.derive(frame, admissions)
    # each time and number column is parsed once per batch, however many events use it
    times = {spec.time for spec in table.events if spec.time}
    numbers = {spec.numeric for spec in table.events if spec.numeric}
    frame = frame.with_columns(
        *(parse_times(frame[c]).alias(f"_time_{c}") for c in times),
        *(pl.col(c).str.strip_chars().cast(pl.Float32, strict=False).alias(f"_number_{c}") for c in numbers),
    )
    _count_rows(table, frame, source, first_line, path, report)
    for spec in table.events:
        yield source, _cut_event(spec, frame, source, first_line, path, report)


def _count_rows(table: TableSpec, frame: pl.DataFrame, source: str, first_line: int, path: Path, report) -> None:
    """Each row is converted (at least one of its events has a time) or skipped by its first failing event's
    reason; an event lost from a converted row is counted as a reduction (strict mode stops on either)."""
    produced = [
        pl.lit(True) if spec.time is None else pl.col(f"_time_{spec.time}").is_not_null() for spec in table.events
    ]
    converted = pl.any_horizontal(*produced)
    checks, failed_before = [], pl.lit(False)
    for spec in table.events:
        if spec.time is None:
            continue
        parsed, missing = pl.col(f"_time_{spec.time}"), pl.col(spec.time).is_null()
        failures = [(~missing & parsed.is_null(), f"unparseable date in {spec.time}")]
        if not spec.optional:
            failures.append((missing, f"no {spec.time}"))
        for failure, reason in failures:
            checks.append((~converted & ~failed_before & failure, reason, spec.time, False))
            checks.append((converted & failure, f"{reason} (that event not written)", spec.time, True))
        failed_before = failed_before | pl.any_horizontal(*(failure for failure, _ in failures))
    checks.append((~converted & ~failed_before, "no time in any event column", table.events[0].time, False))
    _count(report, source, frame, checks, first_line, path)
    report.converted(source, int(frame.select(converted.sum()).item()))


def _cut_event(
    spec: EventSpec, frame: pl.DataFrame, source: str, first_line: int, path: Path, report: ConversionReport
) -> pl.DataFrame:
    checks = []  # (bad-row mask, reason, column, kept) counted in one pass; times are counted by _count_rows
    columns = [pl.col("subject_id")]
    if spec.time is None:
        columns.append(pl.lit(None, dtype=pl.Datetime("us")).alias("time"))
    else:
        columns.append(pl.col(f"_time_{spec.time}").alias("time"))
    columns.append(pl.concat_str([_code_part(p) for p in spec.code], separator="//").alias("code"))
    if spec.numeric:
        number = pl.col(f"_number_{spec.numeric}")
        not_number = pl.col(spec.numeric).is_not_null() & number.is_null()
        checks.append((not_number, f"{spec.numeric} not a number (blanked)", spec.numeric, True))
        columns.append(number.alias("numeric_value"))
    if spec.text:
        text = pl.col(spec.text)
        if spec.numeric:  # a text that only repeats the number is dropped (as in the official ETL)
            repeats = text.str.strip_chars().cast(pl.Float32, strict=False) == pl.col(f"_number_{spec.numeric}")
            text = pl.when(repeats.fill_null(False)).then(None).otherwise(text)
        columns.append(text.alias("text_value"))
    for out, src in spec.extras.items():
        dtype = EXTRA_COLUMNS[out]
        value = pl.col(src)
        if dtype.is_numeric():
            value = value.str.strip_chars().cast(pl.Float64, strict=False).cast(dtype, strict=False)
        columns.append(value.alias(out))
    _count(report, source, frame, checks, first_line, path)
    if spec.time is not None:
        frame = frame.filter(pl.col(f"_time_{spec.time}").is_not_null())
    return frame.select(columns)


def _count(report, source, frame, checks, first_line, path) -> None:
    """Count the rows each mask marks (one pass over the batch) and locate the first for strict mode."""
    if not checks:
        return
    found = frame.select(
        *(mask.sum().alias(f"n{i}") for i, (mask, *_) in enumerate(checks)),
        *(pl.col("_row").filter(mask).first().alias(f"row{i}") for i, (mask, *_) in enumerate(checks)),
    ).row(0, named=True)
    for i, (_, reason, column, kept) in enumerate(checks):
        if found[f"n{i}"]:
            where = f"{path} line {first_line + found[f'row{i}']} ({column})"
            report.problem(source, reason, where, n=found[f"n{i}"], kept=kept)


# ---------------------------------------------------------------------------------------------------------------
# code descriptions and parent codes for metadata/codes.parquet


def icd_parent(version: str, code: str, kind: str) -> str:
    """ICD code as written in ontologies (dotted): ICD9CM/428.0, ICD10CM/I50.9, ICD9Proc/88.54, ICD10PCS/0BB38ZX."""
    code = code.strip()
    if kind == "DIAGNOSIS":
        if version == "9":
            cut = 4 if code.startswith("E") else 3
            return f"ICD9CM/{code[:cut]}.{code[cut:]}" if len(code) > cut else f"ICD9CM/{code}"
        return f"ICD10CM/{code[:3]}.{code[3:]}" if len(code) > 3 else f"ICD10CM/{code}"
    if version == "9":
        return f"ICD9Proc/{code[:2]}.{code[2:]}" if len(code) > 2 else f"ICD9Proc/{code}"
    return f"ICD10PCS/{code}"


def code_metadata(root: str | Path) -> Callable[[pl.Series], pl.DataFrame]:
    """A function from the dataset's codes to (code, description, parent_codes), using the d_* dictionaries."""
    root = Path(root)

    def dictionary(path: str, columns: list[str]) -> pl.DataFrame | None:
        file = find_table(root, path)
        if file is None or not set(columns) <= set(csv_columns(file)):
            return None
        frames = [b.frame for b in stream_csv(file, columns, path, ConversionReport())]
        return pl.concat(frames) if frames else None

    icd = {
        "DIAGNOSIS": dictionary("hosp/d_icd_diagnoses", ["icd_code", "icd_version", "long_title"]),
        "PROCEDURE": dictionary("hosp/d_icd_procedures", ["icd_code", "icd_version", "long_title"]),
    }
    labitems = dictionary("hosp/d_labitems", ["itemid", "label", "fluid", "category"])
    items = dictionary("icu/d_items", ["itemid", "label"])

    def describe(codes: pl.Series) -> pl.DataFrame:
        parts = pl.DataFrame({"code": codes}).with_columns(pl.col("code").str.split("//").alias("p"))
        parts = parts.with_columns(
            pl.col("p").list.get(0, null_on_oob=True).alias("family"),
            pl.col("p").list.get(1, null_on_oob=True).alias("p1"),
            pl.col("p").list.get(2, null_on_oob=True).alias("p2"),
            pl.col("p").list.get(3, null_on_oob=True).alias("p3"),
        )
        out = []
        for family, table in icd.items():
            rows = parts.filter((pl.col("family") == family) & (pl.col("p1") == "ICD"))
            if table is not None and rows.height:
                rows = rows.join(table, left_on=["p2", "p3"], right_on=["icd_version", "icd_code"], how="left")
                parents = [[icd_parent(v, c, family)] for v, c in zip(rows["p2"], rows["p3"])]
                out.append(
                    rows.select("code", pl.col("long_title").alias("description"), pl.Series("parent_codes", parents))
                )
        if labitems is not None:
            labels = labitems.select(
                "itemid", pl.format("{} ({}, {})", "label", "fluid", "category").alias("description")
            )
            rows = parts.filter(pl.col("family") == "LAB").join(labels, left_on="p1", right_on="itemid", how="inner")
            out.append(rows.select("code", "description"))
        if items is not None:
            itemised = ("LAB", "INFUSION_START", "INFUSION_END", "SUBJECT_FLUID_OUTPUT")
            rows = parts.filter(pl.col("family").is_in(itemised)).join(
                items, left_on="p1", right_on="itemid", how="inner"
            )
            procedure = parts.filter((pl.col("family") == "PROCEDURE") & pl.col("p1").is_in(["START", "END"]))
            rows = pl.concat([rows, procedure.join(items, left_on="p2", right_on="itemid", how="inner")])
            out.append(rows.select("code", pl.col("label").alias("description")))
        out = [
            o.with_columns(pl.col("parent_codes").cast(pl.List(pl.String)))
            if "parent_codes" in o.columns
            else o.with_columns(pl.lit(None, dtype=pl.List(pl.String)).alias("parent_codes"))
            for o in out
        ]
        if not out:
            return pl.DataFrame(
                schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}
            )
        return pl.concat(out, how="vertical_relaxed")

    return describe
