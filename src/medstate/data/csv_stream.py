"""Streaming a large (gzipped) CSV file in batches of string columns, with bounded memory.

Every column is read as a string: typing is the reader's job, so that a malformed value becomes a counted problem
(with its line number) instead of a crash or a silently inferred type. A truncated or corrupt file yields what was
readable and reports the rest as one problem.
"""

from __future__ import annotations

import csv
import gzip
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.csv as pa_csv

from medstate.data.report import ConversionReport

BLOCK_BYTES = 16 << 20


@dataclass
class CsvBatch:
    frame: pl.DataFrame
    first_line: int  # file line number of the batch's first row (the header is line 1)


TRUNCATED = "unreadable or truncated file (rows from the damaged block on are lost)"


def csv_columns(path: Path) -> list[str]:
    """The header of a CSV (plain or .gz) file: only its first line is decompressed."""
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", newline="") as handle:
        return next(csv.reader([handle.readline()]), [])


def stream_csv(
    path: Path, columns: list[str], source: str, report: ConversionReport, block_bytes: int = BLOCK_BYTES
) -> Iterator[CsvBatch]:
    """Yield batches with the requested columns, as strings (empty fields are null)."""
    convert = pa_csv.ConvertOptions(
        column_types={name: pa.string() for name in columns},
        include_columns=columns,
        strings_can_be_null=True,
        null_values=[""],
    )
    line = 2
    try:
        reader = pa_csv.open_csv(path, read_options=pa_csv.ReadOptions(block_size=block_bytes), convert_options=convert)
        with reader:
            for record_batch in reader:
                frame = pl.from_arrow(record_batch)
                yield CsvBatch(frame=frame, first_line=line)
                line += frame.height
    except (pa.ArrowInvalid, OSError, EOFError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        report.lost_file(path, f"{TRUNCATED}, after line {line - 1}: {message}", line - 2)
