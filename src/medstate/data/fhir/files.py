"""FHIR files → resources: which files to read and in what order, and every resource of a file (Bundle JSON,
JSON arrays, NDJSON lines; plain or gzip; a UTF-8 byte-order mark read past). What cannot be read is counted in
the conversion report, never raised."""

from __future__ import annotations

import fnmatch
import gzip
import re
import zlib
from collections.abc import Iterator
from pathlib import Path

import orjson

from medstate.data.report import ConversionReport
from medstate.errors import MedstateError

SUFFIXES = (".ndjson", ".ndjson.gz", ".json", ".json.gz")
BOM = b"\xef\xbb\xbf"


def type_of(resource: object) -> str | None:
    if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
        return resource["resourceType"]
    return None


def type_priority(kind: str | None) -> int:
    """Patients, encounters and medications first, so that later resources find them."""
    # a DiagnosticReport comes after the DocumentReferences, whose note text it may repeat
    return {"Patient": 0, "Encounter": 1, "Medication": 2, "DiagnosticReport": 4}.get(kind or "", 3)


def file_priority(path: Path) -> int:
    name = path.name
    for kind in ("Patient", "Encounter"):
        if kind in name:
            return type_priority(kind)
    if "DiagnosticReport" in name:
        return type_priority("DiagnosticReport")
    return 2 if re.search(r"Medication(?!Request|Administration|Dispense|Statement)", name) else 3


def discover(root: Path, exclude_files: list[str]) -> list[Path]:
    """The FHIR files of `root` (a file or a folder searched recursively) less `exclude_files` (globs on file
    names), in reading order: the files of patients, encounters and medications first."""
    if root.is_file():
        files = [root]
    elif root.is_dir():
        files = [p for p in root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)]
        files = [p for p in files if not any(fnmatch.fnmatch(p.name, pattern) for pattern in exclude_files)]
    else:
        raise MedstateError(f"FHIR input {root} does not exist")
    if not files:
        raise MedstateError(f"no FHIR files ({', '.join(SUFFIXES)}) under {root}")
    return sorted(files, key=lambda p: (file_priority(p), str(p)))


def read_resources(path: Path, report: ConversionReport) -> Iterator[tuple[object, str]]:
    """Every resource of a file with where it was found. A Bundle (a file, an NDJSON line or an array item)
    gives its entries; a JSON array gives its items; a UTF-8 byte-order mark is read past. A file that cannot
    be read to its end is a lost file (report.lost_files), apart from its records."""
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    try:
        with opener(path, "rb") as handle:
            if path.name.endswith((".ndjson", ".ndjson.gz")):
                for number, line in enumerate(handle, start=1):
                    line = line.removeprefix(BOM) if number == 1 else line
                    if not line.strip():
                        continue
                    where = f"{path} line {number}"
                    try:
                        document = orjson.loads(line)
                    except orjson.JSONDecodeError as err:
                        report.read("(invalid JSON)")
                        report.counts_conversions("(invalid JSON)")
                        report.problem("(invalid JSON)", "invalid JSON line", f"{where}: {err}")
                        continue
                    for resource, place in unpack(document, where):
                        count += 1
                        yield resource, place
            else:
                data = handle.read().removeprefix(BOM)
                try:
                    document = orjson.loads(data)
                except orjson.JSONDecodeError as err:
                    estimate = max(0, data.count(b'"resourceType"') - 1) or None
                    report.lost_file(path, f"not valid JSON, possibly truncated ({err})", 0, estimate)
                    return
                for resource, place in unpack(document, str(path)):
                    count += 1
                    yield resource, place
    except (EOFError, OSError, zlib.error) as err:
        report.lost_file(path, f"unreadable or truncated file, the rest of it lost ({err})", count)


def unpack(document: object, where: str) -> Iterator[tuple[object, str]]:
    """A Bundle → its entries' resources (Patients and Encounters first); a JSON array → its items; else itself."""
    if isinstance(document, list):
        for index, item in enumerate(document):
            yield from unpack(item, f"{where} item {index}")
    elif isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry") or []
        resources = (
            [e.get("resource") if isinstance(e, dict) else e for e in entries] if isinstance(entries, list) else []
        )
        numbered = sorted(enumerate(resources), key=lambda e: type_priority(type_of(e[1])))
        for index, resource in numbered:
            if isinstance(resource, list) or type_of(resource) == "Bundle":
                yield from unpack(resource, f"{where} entry {index}")
            else:  # the common case, without a generator per resource
                yield resource, f"{where} entry {index}"
    else:
        yield document, where
