"""The FHIR reader: files (`files`) → resources → events (`mapping`), batched into MEDS frames, with the code
descriptions and the subject map the conversion writes beside them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import polars as pl

from medstate.data.fhir.files import discover, read_resources
from medstate.data.fhir.mapping import ResourceMapper
from medstate.data.fhir.values import stable_subject_id, time_zone
from medstate.data.report import ConversionReport

# time_precision: "day" where the source gave a date without a time (the time is then 00:00 of that day)
EXTRA_COLUMNS: dict[str, pl.DataType] = {"unit": pl.String, "encounter_id": pl.String, "time_precision": pl.String}
BATCH_ROWS = 200_000


class FhirReader:
    def __init__(
        self,
        root: str | Path,
        report: ConversionReport,
        progress: Callable[[str, int], None] | None = None,
        exclude_files: list[str] | None = None,
        timezone: str = "UTC",
        resource_keys: bool = False,
    ):
        """`exclude_files`: glob patterns on file names to leave out (e.g. "*ED.ndjson.gz" for a module).
        `timezone`: the zone every time is written in (offset-aware times converted, naive ones read as in it).
        `resource_keys`: each event also names the resource version it came from (`_resource`:
        "Observation/7/_history/2"), for idempotent ingestion by a server."""
        self.resource_keys = resource_keys
        self.zone = time_zone(timezone)
        self.root = Path(root)
        self.report = report
        self.progress = progress or (lambda source, n: None)
        self.files = discover(self.root, exclude_files or [])
        self.mapper = ResourceMapper(report, self.zone)
        self.referenced: Counter = Counter()  # events per referenced Patient.id

    @property
    def input_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def events(self) -> Iterator[tuple[str | None, pl.DataFrame]]:
        """Yield batches of events (with a `_source` column naming the resource type)."""
        mapper = self.mapper
        for path in self.files:
            resources_read = 0
            for resource, where in read_resources(path, self.report):
                resources_read += 1
                mapper.convert(resource, where)
                if len(mapper.rows) >= BATCH_ROWS:
                    yield None, self._flush()
            self.progress(path.name, resources_read)
        pending, mapper.pending = mapper.pending, []
        for resource, where in pending:
            mapper.convert(resource, where, final=True)
        orphans = {pid: n for pid, n in self.referenced.items() if pid not in mapper.patients}
        if orphans:
            self.report.note(
                f"{sum(orphans.values())} events reference {len(orphans)} patients with no Patient resource "
                "(kept: they have no gender, birth or death facts)"
            )
        if mapper.rows:
            yield None, self._flush()

    def _flush(self) -> pl.DataFrame:
        rows = self.mapper.take_rows()
        patients = [row[0] for row in rows]
        self.referenced.update(patients)
        ids = {pid: stable_subject_id(pid) for pid in set(patients)}
        names = ("time", "code", "numeric_value", "text_value", "unit", "encounter_id", "_source", "time_precision")
        if self.resource_keys:
            names = (*names, "_resource")
        return pl.DataFrame(
            {"subject_id": [ids[p] for p in patients], **dict(zip(names, list(zip(*rows))[1:]))},
            schema={
                "subject_id": pl.Int64,
                "time": pl.Datetime("us"),
                "code": pl.String,
                "numeric_value": pl.Float64,
                "text_value": pl.String,
                "unit": pl.String,
                "encounter_id": pl.String,
                "_source": pl.String,
                "time_precision": pl.String,
                **({"_resource": pl.String} if self.resource_keys else {}),
            },
        )

    def code_metadata(self, codes: pl.Series) -> pl.DataFrame:
        """Descriptions for codes.parquet from the displays the export gave: the displays of the known
        '<vocabulary>//<code>' parts of an event code, left to right (DIAGNOSIS//SNOMED//38341003 → its display;
        a question and its coded answer → "question: answer")."""
        rows, displays = [], self.mapper.displays
        for code in codes.to_list():
            parts, found, i = code.split("//"), [], 1
            while i < len(parts):
                j = next((j for j in range(len(parts), i, -1) if "//".join(parts[i:j]) in displays), None)
                if j is None:
                    i += 1
                    continue
                found.append(displays["//".join(parts[i:j])])
                i = j
            rows.append((code, ": ".join(found) or None, None))
        return pl.DataFrame(
            rows, schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}, orient="row"
        )

    def subject_map(self) -> pl.DataFrame:
        rows = [
            (stable_subject_id(pid), pid, system, value)
            for pid, identifiers in self.mapper.patients.items()
            for system, value in identifiers
        ]
        return pl.DataFrame(
            rows,
            schema={
                "subject_id": pl.Int64,
                "source_id": pl.String,
                "identifier_system": pl.String,
                "identifier_value": pl.String,
            },
            orient="row",
        ).sort("subject_id")
