"""Documents from files, streamed: JSON Lines (optionally gzipped), a JSON object of records keyed by id, Parquet,
plain text (one document per file), WikiText's raw layout (one document per top-level heading) and the NOTE
events of a MEDS dataset.

A `CorpusSource` is plain data (a corpus YAML lists them); `read_documents(source)` yields `Document`s one at a
time, so a corpus larger than memory works. A document's id is `namespace:value` (the namespace defaults to the
source's name): two sources that share a namespace, e.g. `pmid` for PubMed abstracts and PubMedQA, can be matched
by id, and ids of unrelated sources never collide.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medstate.errors import MedstateError
from medstate.loading import PATH, load_settings

FORMATS = ("auto", "jsonl", "json", "csv", "parquet", "text", "wikitext", "meds-notes")


@dataclass(frozen=True)
class Document:
    id: str
    text: str


@dataclass
class CorpusSource:
    """One corpus. `text_fields` are joined by a blank line (a list value, such as PubMedQA's contexts, by a line
    break); `id_field` names the record's id (records without one are numbered); `weight` is its share in a mix."""

    name: str
    path: str = field(metadata=PATH)
    format: str = "auto"
    text_fields: list[str] = field(default_factory=lambda: ["text"])
    id_field: str | None = None
    id_namespace: str | None = None
    weight: float = 1.0
    limit: int | None = None
    note_codes: str = "^NOTE//"  # meds-notes: the codes whose text_value is a note
    select: dict[str, str] = field(default_factory=dict)  # record files: only records with these field values

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise MedstateError(f"corpus {self.name!r}: unknown format {self.format!r}; choose one of {FORMATS}")
        if self.weight < 0:
            raise MedstateError(f"corpus {self.name!r}: weight must be >= 0, got {self.weight}")
        if self.select and self.resolved_format() not in ("jsonl", "json", "csv", "parquet"):
            raise MedstateError(f"corpus {self.name!r}: select applies to record files (JSON, CSV, Parquet)")

    @property
    def namespace(self) -> str:
        return self.id_namespace or self.name

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        path = Path(self.path)
        name = path.name.removesuffix(".gz")
        if path.is_dir():
            return "meds-notes" if (path / "data").is_dir() else "text"
        for suffix, kind in (*((f".{k}", k) for k in ("jsonl", "json", "csv", "parquet")), (".txt", "text")):
            if name.endswith(suffix):
                return kind
        if name.endswith(".raw"):
            return "wikitext"
        raise MedstateError(f"corpus {self.name!r}: cannot tell the format of {self.path}; set format")


@dataclass
class CorpusList:
    corpora: list[CorpusSource]


def read_corpus_list(path: str | Path) -> list[CorpusSource]:
    """A YAML file with a `corpora:` list; relative paths are relative to the file's folder."""
    listed = load_settings(CorpusList, path, what="corpus list").corpora
    if not listed:
        raise MedstateError(f"{path}: the corpora list is empty")
    return listed


def read_documents(source: CorpusSource, empty: Counter | None = None) -> Iterator[Document]:
    """The source's documents in file order, at most `limit` of them. Documents with no text are skipped, and
    counted in `empty[source.name]` when a counter is given."""
    path = Path(source.path)
    if not path.exists():
        raise MedstateError(f"corpus {source.name!r}: {path} not found")
    reader = _READERS[source.resolved_format()]
    count = 0
    for document in reader(source, path):
        if not document.text.strip():
            if empty is not None:
                empty[source.name] += 1
            continue
        if source.limit is not None and count >= source.limit:
            return
        count += 1
        yield document


def _text_of(record: dict[str, Any], source: CorpusSource, where: str) -> str:
    parts = []
    for name in source.text_fields:
        if name not in record:
            raise MedstateError(f"{where}: no field {name!r} (fields: {', '.join(record)[:200]})")
        value = record[name]
        if isinstance(value, list):
            value = "\n".join(str(v) for v in value)
        if value:
            parts.append(str(value))
    return "\n\n".join(parts)


def _document(record: Any, number: int, source: CorpusSource, where: str, key: str | None = None) -> Document:
    if not isinstance(record, dict):
        raise MedstateError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    value = key if key is not None else record.get(source.id_field) if source.id_field else number
    if value is None:
        raise MedstateError(f"{where}: no id field {source.id_field!r}")
    return Document(f"{source.namespace}:{value}", _text_of(record, source, where))


def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def read_records(path: str | Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, record) for each record of a JSON Lines, JSON (an object of records keyed by id, whose key is added
    as `_key`, or a list of records), CSV or Parquet file, optionally gzipped."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        yield from _parquet_records(path, columns)
        return
    with _open_text(path) as handle:
        if name.endswith(".jsonl"):
            for number, line in enumerate(handle, 1):
                if line.strip():
                    yield f"{path}:{number}", _json(line, f"{path}:{number}")
        elif name.endswith(".json"):
            data = _json(handle.read(), str(path))
            if isinstance(data, dict):
                for key, record in data.items():
                    yield f"{path}: {key}", {**record, "_key": key} if isinstance(record, dict) else record
            elif isinstance(data, list):
                for number, record in enumerate(data, 1):
                    yield f"{path}: item {number}", record
            else:
                raise MedstateError(f"{path}: expected a JSON object of records or a list of records")
        elif name.endswith(".csv"):
            for number, record in enumerate(csv.DictReader(handle), 2):
                yield f"{path}:{number}", record
        else:
            raise MedstateError(f"{path}: records are read from .jsonl, .json, .csv or .parquet files")


def _json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise MedstateError(f"{where}: not valid JSON ({err.msg})") from None


def _parquet_records(path: Path, columns: list[str] | None) -> Iterator[tuple[str, dict[str, Any]]]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path)
    missing = [c for c in columns or [] if c not in parquet.schema_arrow.names]
    if missing:
        raise MedstateError(f"{path}: no column(s) {', '.join(missing)}")
    number = 0
    for batch in parquet.iter_batches(columns=columns, batch_size=1024):
        for record in batch.to_pylist():
            number += 1
            yield f"{path}: row {number}", record


def _read_records(source: CorpusSource, path: Path) -> Iterator[Document]:
    columns = [*source.text_fields, *([source.id_field] if source.id_field else []), *source.select]
    number = 0
    for where, record in read_records(path, list(dict.fromkeys(columns))):
        if isinstance(record, dict) and source.select:
            missing = [name for name in source.select if name not in record]
            if missing:
                raise MedstateError(f"{where}: no field {missing[0]!r} to select on")
            if any(str(record[name]) != str(value) for name, value in source.select.items()):
                continue
        number += 1
        key = record.pop("_key", None) if isinstance(record, dict) and not source.id_field else None
        yield _document(record, number, source, where, key)


def _read_text(source: CorpusSource, path: Path) -> Iterator[Document]:
    files = sorted(p for p in path.rglob("*.txt")) if path.is_dir() else [path]
    for file in files:
        with _open_text(file) as handle:
            name = file.relative_to(path) if path.is_dir() else file.name
            yield Document(f"{source.namespace}:{name}", handle.read())


_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


def _read_wikitext(source: CorpusSource, path: Path) -> Iterator[Document]:
    """WikiText raw files: an article starts at a line ` = Title = ` (sections use `= =`)."""
    title, lines = None, []
    with _open_text(path) as handle:
        for line in handle:
            if _WIKITEXT_TITLE.match(line.rstrip("\n")):
                if title is not None:
                    yield Document(f"{source.namespace}:{title}", "".join(lines))
                title, lines = line.strip(" =\n"), [line]
            elif title is not None:
                lines.append(line)
    if title is not None:
        yield Document(f"{source.namespace}:{title}", "".join(lines))


def _read_meds_notes(source: CorpusSource, path: Path) -> Iterator[Document]:
    """NOTE events of a MEDS dataset, in its shard order: one document per event with a text_value."""
    import polars as pl

    from medstate.data.meds import data_files, scan_meds_file
    from medstate.loading import compile_pattern

    pattern = compile_pattern(source.note_codes, f"corpus {source.name!r}: note_codes")
    for file in data_files(path):
        frame = (
            scan_meds_file(path, file)
            .filter(pl.col("code").str.contains(pattern.pattern) & pl.col("text_value").is_not_null())
            .select("subject_id", "time", "code", "text_value")
            .collect()
        )
        shard = file.relative_to(path / "data").with_suffix("")
        for number, row in enumerate(frame.iter_rows(named=True)):
            yield Document(f"{source.namespace}:{shard}#{number}", row["text_value"])


_READERS = {
    "jsonl": _read_records,
    "json": _read_records,
    "csv": _read_records,
    "parquet": _read_records,
    "text": _read_text,
    "wikitext": _read_wikitext,
    "meds-notes": _read_meds_notes,
}
