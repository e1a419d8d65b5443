"""FHIR R4 → MEDS events: Bundle JSON files and bulk-export NDJSON (plain or gzip), streamed resource by resource.

Codes are `<FAMILY>//<vocabulary>//<code>`, the vocabulary coming from one table (`resources/code_systems.csv`), so
that a Condition coded in ICD-9-CM becomes the `DIAGNOSIS//ICD//9//4280` the MIMIC-IV CSV reader writes. Families:

    Patient                 GENDER//<F|M|O|UNK> (static), MEDS_BIRTH, MEDS_DEATH
    Encounter               ENCOUNTER_START//<class> at period.start (text_value: its type), ENCOUNTER_END//<class>
                            at period.end (text_value: the discharge disposition code, e.g. `exp` = died)
    Condition               DIAGNOSIS//…   at onset, else recordedDate, else its encounter's end (as MIMIC-IV dates
                                           diagnoses at discharge)
    Procedure               PROCEDURE//…   at performed[DateTime|Period.start]
    Observation             LAB (laboratory), VITAL (vital-signs) or OBSERVATION (other categories)//…[//unit];
                            components become events of their own
    Medication{Request,Administration,Dispense,Statement}
                            MEDICATION//<REQUEST|ADMINISTRATION|DISPENSE|STATEMENT>//…
    Immunization            IMMUNIZATION//…
    AllergyIntolerance      ALLERGY//…
    DiagnosticReport        REPORT//…      (presentedForm text kept)
    DocumentReference       NOTE//…        (attachment text, base64-decoded, kept as text_value)

Times are written in one zone (UTC unless `timezone` names another): a time with a UTC offset is converted to it,
a time without one is read as already in it (recorded in metadata/dataset.json), so a patient's events never
reorder because an export mixes offsets. Subject ids are stable 63-bit hashes of Patient.id, so the same patient
gets the same id in every run and
every file order; `subject_map()` links them back to Patient.id and each Patient.identifier.
"""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import fnmatch
import gzip
import hashlib
import re
import zlib
import zoneinfo
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import orjson
import polars as pl

from medstate.data.report import ConversionReport
from medstate.errors import MedstateError

# time_precision: "day" where the source gave a date without a time (the time is then 00:00 of that day)
EXTRA_COLUMNS: dict[str, pl.DataType] = {"unit": pl.String, "encounter_id": pl.String, "time_precision": pl.String}
BATCH_ROWS = 200_000
SUFFIXES = (".ndjson", ".ndjson.gz", ".json", ".json.gz")
BOM = b"\xef\xbb\xbf"
GENDERS = {"female": "F", "male": "M", "other": "O", "unknown": "UNK"}
MEDICATION_KINDS = {
    "MedicationRequest": ("REQUEST", ("authoredOn",)),
    "MedicationAdministration": ("ADMINISTRATION", ("effectiveDateTime", "effectivePeriod")),
    "MedicationDispense": ("DISPENSE", ("whenHandedOver", "whenPrepared")),
    "MedicationStatement": ("STATEMENT", ("effectiveDateTime", "effectivePeriod", "dateAsserted")),
}


@dataclass(frozen=True)
class Vocabulary:
    prefix: str  # e.g. "ICD//9", "SNOMED"; empty: the code is written bare
    strip_dots: bool


def load_code_systems() -> dict[str, Vocabulary]:
    """The one table from FHIR code-system URIs to vocabulary prefixes."""
    text = resources.files("medstate.data").joinpath("resources/code_systems.csv").read_text()
    return {
        row["system"]: Vocabulary(row["vocabulary"], row["strip_dots"] == "true")
        for row in csv.DictReader(text.splitlines())
    }


def stable_subject_id(patient_id: str) -> int:
    """A 63-bit non-negative int64 from Patient.id: the same on every machine and in every run."""
    return int.from_bytes(hashlib.blake2b(patient_id.encode(), digest_size=8).digest(), "big") >> 1


def time_zone(name: str) -> zoneinfo.ZoneInfo:
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise MedstateError(f"unknown time zone {name!r}; use an IANA name such as UTC or America/New_York") from None


class Day(dt.datetime):
    """A FHIR date without a time of day: midnight of that day, marked as known to the day only."""


def parse_fhir_time(value: str, zone: dt.tzinfo = dt.UTC) -> dt.datetime:
    """FHIR date/dateTime/instant → naive datetime in `zone`: a time with a UTC offset is converted to the zone,
    a time without one is read as the zone's already. Partial dates (YYYY, YYYY-MM) take the first day."""
    if not isinstance(value, str):
        raise ValueError(f"not a date: {value!r}")
    if len(value) == 4:
        return Day(int(value), 1, 1)
    if len(value) == 7:
        return Day(int(value[:4]), int(value[5:7]), 1)
    if len(value) == 10:
        day = dt.date.fromisoformat(value)
        return Day(day.year, day.month, day.day)
    moment = dt.datetime.fromisoformat(value)
    return moment if moment.tzinfo is None else moment.astimezone(zone).replace(tzinfo=None)


class _Skip(Exception):
    """A record that cannot become an event; the reason is counted (or raised in strict mode)."""


def _reference_id(reference: object) -> str | None:
    """'Patient/abc', 'urn:uuid:abc', 'abc' → 'abc' (None when absent or not a literal reference)."""
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    ref = reference["reference"]
    if ref.startswith("urn:uuid:"):
        return ref[9:]
    if "?" in ref:  # a conditional (search) reference cannot be resolved offline
        return None
    return ref.rstrip("/").split("/")[-1] or None


def _coding_code(concept: object) -> str | None:
    """The code of a CodeableConcept's first coding that has one (None when there is none)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    for coding in codings if isinstance(codings, list) else []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str) and coding["code"]:
            return coding["code"]
    return None


def _type_priority(resource_type: str | None) -> int:
    """Patients, encounters and medications first, so that later resources find them."""
    # a DiagnosticReport comes after the DocumentReferences, whose note text it may repeat
    return {"Patient": 0, "Encounter": 1, "Medication": 2, "DiagnosticReport": 4}.get(resource_type or "", 3)


def _file_priority(path: Path) -> int:
    name = path.name
    for resource_type in ("Patient", "Encounter"):
        if resource_type in name:
            return _type_priority(resource_type)
    if "DiagnosticReport" in name:
        return _type_priority("DiagnosticReport")
    return 2 if re.search(r"Medication(?!Request|Administration|Dispense|Statement)", name) else 3


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
        self._resource: str | None = None
        self.zone = time_zone(timezone)
        self.root = Path(root)
        self.exclude_files = exclude_files or []
        self.report = report
        self.progress = progress or (lambda source, n: None)
        self.code_systems = load_code_systems()
        self.files = self._discover()
        self.encounters: dict[str, tuple[dt.datetime | None, dt.datetime | None]] = {}
        self.medications: dict[str, tuple[str, str]] = {}
        self.patients: dict[str, list[tuple[str | None, str | None]]] = {}
        self.referenced: Counter = Counter()  # events per referenced Patient.id
        self.pending: list[tuple[dict, str]] = []
        self.displays: dict[str, str] = {}  # '<vocabulary>//<code>' → the display the export gives it
        self.note_texts: dict[str, set[bytes]] = {}  # Patient.id → digests of the note texts written
        self._rows: list[tuple] = []  # committed events: (patient, time, code, numeric, text, unit, encounter, source,
        # time precision)
        self._current: list[tuple] = []  # the events of the resource being converted, kept only if it converts

    @property
    def input_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files)

    def _discover(self) -> list[Path]:
        if self.root.is_file():
            files = [self.root]
        elif self.root.is_dir():
            files = [p for p in self.root.rglob("*") if p.is_file() and p.name.endswith(SUFFIXES)]
            files = [p for p in files if not any(fnmatch.fnmatch(p.name, pattern) for pattern in self.exclude_files)]
        else:
            raise MedstateError(f"FHIR input {self.root} does not exist")
        if not files:
            raise MedstateError(f"no FHIR files ({', '.join(SUFFIXES)}) under {self.root}")
        return sorted(files, key=lambda p: (_file_priority(p), str(p)))

    # ----------------------------------------------------------------------------------------------------------
    # reading

    def events(self) -> Iterator[tuple[str | None, pl.DataFrame]]:
        """Yield batches of events (with a `_source` column naming the resource type)."""
        for path in self.files:
            resources_read = 0
            for resource, where in self._resources(path):
                resources_read += 1
                self._convert(resource, where)
                if len(self._rows) >= BATCH_ROWS:
                    yield None, self._flush()
            self.progress(path.name, resources_read)
        pending, self.pending = self.pending, []
        for resource, where in pending:
            self._convert(resource, where, final=True)
        orphans = {pid: n for pid, n in self.referenced.items() if pid not in self.patients}
        if orphans:
            self.report.note(
                f"{sum(orphans.values())} events reference {len(orphans)} patients with no Patient resource "
                "(kept: they have no gender, birth or death facts)"
            )
        if self._rows:
            yield None, self._flush()

    def _resources(self, path: Path) -> Iterator[tuple[object, str]]:
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
                            self.report.read("(invalid JSON)")
                            self.report.counts_conversions("(invalid JSON)")
                            self.report.problem("(invalid JSON)", "invalid JSON line", f"{where}: {err}")
                            continue
                        for resource, place in _unpack(document, where):
                            count += 1
                            yield resource, place
                else:
                    data = handle.read().removeprefix(BOM)
                    try:
                        document = orjson.loads(data)
                    except orjson.JSONDecodeError as err:
                        estimate = max(0, data.count(b'"resourceType"') - 1) or None
                        self.report.lost_file(path, f"not valid JSON, possibly truncated ({err})", 0, estimate)
                        return
                    for resource, place in _unpack(document, str(path)):
                        count += 1
                        yield resource, place
        except (EOFError, OSError, zlib.error) as err:
            self.report.lost_file(path, f"unreadable or truncated file, the rest of it lost ({err})", count)

    # ----------------------------------------------------------------------------------------------------------
    # one resource → events

    def _convert(self, resource: object, where: str, final: bool = False) -> None:
        resource_type = _resource_type(resource)
        if resource_type is None:
            self.report.read("(no resourceType)")
            self.report.counts_conversions("(no resourceType)")
            self.report.problem("(no resourceType)", "not a FHIR resource (no resourceType)", where)
            return
        if not final:
            self.report.read(resource_type)
            self.report.counts_conversions(resource_type)
        where = f"{where} ({resource_type}/{resource.get('id', '?')})"
        handler = _HANDLERS.get(resource_type)
        if handler is None:
            if resource_type == "Medication":
                self._register_medication(resource)
            self.report.ignore(resource_type)
            return
        if _entered_in_error(resource):
            self.report.left_out(resource_type, "entered in error (status): not a clinical fact")
            return
        self._current = []
        version = (resource.get("meta") or {}).get("versionId") if isinstance(resource.get("meta"), dict) else None
        self._resource = f"{resource_type}/{resource.get('id', '?')}/_history/{version or '-'}"
        waiting = len(self.pending)
        try:
            handler(self, resource, where, final)
        except _Skip as skip:
            self.report.problem(resource_type, str(skip), where)
            return
        except (AttributeError, TypeError, KeyError, ValueError, IndexError):
            # a field of an unexpected JSON shape that no check above names: skipped and counted, never a traceback
            self.report.problem(resource_type, "malformed resource (a field has an unexpected JSON type)", where)
            return
        if len(self.pending) > waiting:
            return  # read again once its encounter or medication is known
        self._commit()
        self.report.converted(resource_type)

    def _known_code(self, concept: object) -> str | None:
        """`_code` of a concept, or None where it has no coding of a known system."""
        try:
            return self._code(concept) if isinstance(concept, dict) and concept.get("coding") else None
        except _Skip:
            return None

    def _subject(self, resource: dict, field: str = "subject") -> str:
        reference = resource.get(field) or resource.get("patient")
        patient_id = _reference_id(reference)
        if patient_id is None:
            raise _Skip("missing subject reference")
        return patient_id

    def _time(self, resource: dict, fields: tuple[str, ...]) -> dt.datetime | None:
        """The first present time field (a Period gives its start); unparseable dates are a skip."""
        for name in fields:
            value = resource.get(name)
            if isinstance(value, dict):  # Period
                value = value.get("start") or value.get("end")
            if value is None:
                continue
            try:
                return parse_fhir_time(value, self.zone)
            except (ValueError, TypeError):
                raise _Skip(f"unparseable date in {name}") from None
        return None

    def _code(self, concept: object) -> str:
        """'<vocabulary>//<code>' (or the bare code) from the first coding whose system the table knows."""
        if concept is not None and not isinstance(concept, dict):
            raise _Skip("malformed: a code is not a CodeableConcept object")
        codings = concept.get("coding") if isinstance(concept, dict) else None
        if codings is not None and not isinstance(codings, list):
            raise _Skip("malformed: coding is not a list of Coding objects")
        if not codings:
            text = concept.get("text") if isinstance(concept, dict) else None
            if isinstance(text, str) and text.strip():  # free text only: kept, marked as such
                return f"TEXT//{text.strip()}"
            raise _Skip("no code")
        for coding in codings:
            if not isinstance(coding, dict):
                raise _Skip("malformed: coding is not a list of Coding objects")
            vocabulary = self.code_systems.get(coding.get("system"))
            code = coding.get("code")
            if vocabulary is not None and isinstance(code, str) and code:
                code = code.replace(".", "") if vocabulary.strip_dots else code
                code = f"{vocabulary.prefix}//{code}" if vocabulary.prefix else code
                if isinstance(coding.get("display"), str) and code not in self.displays:
                    self.displays[code] = coding["display"]
                return code
        raise _Skip(f"unknown code system {codings[0].get('system')}")

    def _emit(self, patient_id, time, code, source, numeric=None, text=None, unit=None, encounter=None) -> None:
        for name, value in (("text", text), ("unit", unit), ("encounter reference", encounter)):
            if value is not None and not isinstance(value, str):
                raise _Skip(f"malformed: a {name} is not a string")
        precision = "day" if isinstance(time, Day) else None
        if precision:
            time = dt.datetime(time.year, time.month, time.day)
        self._current.append(
            (patient_id, time, code, numeric, text, unit, encounter, source, precision, self._resource)
        )

    def _commit(self) -> None:
        self._rows.extend(self._current)
        self._current = []

    def _number(self, value: object, source: str, where: str) -> float | None:
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
        try:
            return float(value)
        except (TypeError, ValueError):
            self.report.problem(source, "value not a number (blanked)", where, kept=True)
            return None

    # handlers ------------------------------------------------------------------------------------------------

    def _patient(self, resource: dict, where: str, final: bool) -> None:
        patient_id = resource.get("id")
        if not isinstance(patient_id, str) or not patient_id:
            raise _Skip("Patient without id")
        if patient_id in self.patients:
            raise _Skip("duplicate Patient")
        identifiers = [
            (i.get("system"), i.get("value")) for i in resource.get("identifier") or [] if isinstance(i, dict)
        ]
        birth = self._time(resource, ("birthDate",))
        death = self._time(resource, ("deceasedDateTime",))
        gender = resource.get("gender")
        gender = GENDERS.get(gender, "UNK") if isinstance(gender, str) or gender is None else "UNK"
        self.patients[patient_id] = identifiers or [(None, None)]
        self._emit(patient_id, None, f"GENDER//{gender}", "Patient")
        for family, (code, display) in _us_core_categories(resource).items():  # race, ethnicity (US Core)
            self._emit(patient_id, None, f"{family}//{code}", "Patient", text=display)
        marital = resource.get("maritalStatus")
        if marital is not None:
            status = _coding_code(marital)
            if status is None or not isinstance(status, str):
                raise _Skip("malformed: maritalStatus has no code")
            self._emit(patient_id, None, f"MARITAL_STATUS//{status}", "Patient")
        if birth is not None:
            self._emit(patient_id, birth, "MEDS_BIRTH", "Patient")
        if death is not None:
            self._emit(patient_id, death, "MEDS_DEATH", "Patient")
        elif resource.get("deceasedBoolean") is True:
            self.report.problem("Patient", "deceased without a date (no MEDS_DEATH event)", where, kept=True)

    def _encounter(self, resource: dict, where: str, final: bool) -> None:
        patient_id = self._subject(resource)
        period = resource.get("period") or {}
        if not isinstance(period, dict):
            raise _Skip("malformed: period is not a Period object")
        try:
            start = parse_fhir_time(period["start"], self.zone) if period.get("start") else None
            end = parse_fhir_time(period["end"], self.zone) if period.get("end") else None
        except (ValueError, TypeError):
            raise _Skip("unparseable date in period") from None
        if start is None and end is None:
            raise _Skip("no time (Encounter without period)")
        encounter_class = resource.get("class") or {}
        class_code = encounter_class.get("code") if isinstance(encounter_class, dict) else None
        class_code = class_code or "UNK"
        kinds = [t.get("text") or (t.get("coding") or [{}])[0].get("display") for t in resource.get("type") or []]
        kind = next((k for k in kinds if k), None)
        encounter_id = resource.get("id")
        if encounter_id:
            self.encounters[encounter_id] = (start, end)
        if start is not None:
            self._emit(
                patient_id, start, f"ENCOUNTER_START//{class_code}", "Encounter", text=kind, encounter=encounter_id
            )
            types = resource.get("type") or []
            type_code = next((c for c in (self._known_code(t) for t in types) if c), None)
            if type_code is not None:  # the encounter's type, coded (its display stays on ENCOUNTER_START)
                self._emit(patient_id, start, f"ENCOUNTER_TYPE//{type_code}", "Encounter", encounter=encounter_id)
        if end is not None:
            disposition = _coding_code((resource.get("hospitalization") or {}).get("dischargeDisposition"))
            self._emit(
                patient_id, end, f"ENCOUNTER_END//{class_code}", "Encounter", text=disposition, encounter=encounter_id
            )

    def _encounter_time(self, resource: dict, where: str, final: bool, field: str = "encounter") -> dt.datetime | None:
        """The end (else start) of the resource's encounter; None and queued when the encounter is not read yet."""
        encounter_id = _reference_id(resource.get(field))
        if encounter_id is None:
            raise _Skip("no time (no date and no encounter)")
        if encounter_id in self.encounters:
            start, end = self.encounters[encounter_id]
            return end or start
        if final:
            raise _Skip("no time (no date, and its encounter was not found)")
        self.pending.append((resource, where))
        return None

    def _condition(self, resource: dict, where: str, final: bool) -> None:
        patient_id = self._subject(resource)
        code = self._code(resource.get("code"))
        time = self._time(resource, ("onsetDateTime", "onsetPeriod", "recordedDate"))
        if time is None:
            time = self._encounter_time(resource, where, final)
            if time is None:
                return
        self._emit(
            patient_id, time, f"DIAGNOSIS//{code}", "Condition", encounter=_reference_id(resource.get("encounter"))
        )

    def _procedure(self, resource: dict, where: str, final: bool) -> None:
        self._simple(resource, where, final, "PROCEDURE", ("performedDateTime", "performedPeriod"))

    def _immunization(self, resource: dict, where: str, final: bool) -> None:
        self._simple(resource, where, final, "IMMUNIZATION", ("occurrenceDateTime",), code_field="vaccineCode")

    def _allergy(self, resource: dict, where: str, final: bool) -> None:
        self._simple(resource, where, final, "ALLERGY", ("onsetDateTime", "recordedDate"))

    def _simple(self, resource, where, final, family, time_fields, code_field="code", text=None) -> None:
        patient_id = self._subject(resource)
        code = self._code(resource.get(code_field))
        time = self._time(resource, time_fields)
        if time is None:
            time = self._encounter_time(resource, where, final, "context" if "context" in resource else "encounter")
            if time is None:
                return
        encounter = _reference_id(resource.get("encounter") or resource.get("context"))
        self._emit(patient_id, time, f"{family}//{code}", resource["resourceType"], text=text, encounter=encounter)

    def _observation(self, resource: dict, where: str, final: bool) -> None:
        patient_id = self._subject(resource)
        time = self._time(resource, ("effectiveDateTime", "effectivePeriod", "effectiveInstant", "issued"))
        if time is None:
            time = self._encounter_time(resource, where, final)
            if time is None:
                return
        concepts = resource.get("category") or []
        if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
            raise _Skip("malformed: category is not a list of CodeableConcept objects")
        categories = {(c.get("code") or "").lower() for concept in concepts for c in (concept.get("coding") or []) if c}
        family = "LAB" if "laboratory" in categories else "VITAL" if "vital-signs" in categories else "OBSERVATION"
        encounter = _reference_id(resource.get("encounter"))
        parts = [resource] if _has_value(resource) or not resource.get("component") else []
        parts += [c for c in resource.get("component") or [] if isinstance(c, dict)]
        events = []  # all parts are checked before any is emitted: a bad component skips the whole resource
        for part in parts:
            code = self._code(part.get("code"))
            numeric, text, unit = self._value(part, "Observation", where)
            answer = self._known_code(part["valueCodeableConcept"]) if "valueCodeableConcept" in part else None
            suffix = f"//{answer}" if answer else f"//{unit}" if unit else ""
            events.append((f"{family}//{code}{suffix}", numeric, text, unit))
        for code, numeric, text, unit in events:
            self._emit(patient_id, time, code, "Observation", numeric, text, unit, encounter)

    def _value(self, element: dict, source: str, where: str) -> tuple[float | None, str | None, str | None]:
        """(numeric_value, text_value, unit) of an Observation value. Forms kept only in part are counted by reason
        (strict mode stops on them)."""
        if "valueQuantity" in element:
            quantity = element["valueQuantity"]
            if not isinstance(quantity, dict):
                raise _Skip("malformed: valueQuantity is not a Quantity object")
            unit = quantity.get("unit") or quantity.get("code")
            number = self._number(quantity.get("value"), source, where)
            comparator = quantity.get("comparator")
            if comparator and number is not None:  # a censored value: "<40" is not 40
                self.report.problem(source, "value with a comparator: number kept, comparator in text_value", where,
                                    kept=True)  # fmt: skip
                return number, f"{comparator}{quantity.get('value')}", unit
            return number, None, unit
        if "valueCodeableConcept" in element:
            concept = element["valueCodeableConcept"] or {}
            if not isinstance(concept, dict):
                raise _Skip("malformed: valueCodeableConcept is not an object")
            coding = next((c for c in concept.get("coding") or [] if isinstance(c, dict)), {})
            if coding and self._known_code(concept) is None:
                self.report.problem(source, "coded answer of an unknown code system: display kept", where, kept=True)
            return None, concept.get("text") or coding.get("display") or coding.get("code"), None
        for name in ("valueString", "valueDateTime", "valueTime", "valueCode"):
            if name in element:
                return None, str(element[name]), None
        if "valueBoolean" in element:
            return None, "true" if element["valueBoolean"] else "false", None
        if "valueInteger" in element:
            return self._number(element["valueInteger"], source, where), None, None
        if "valueRange" in element:
            low, high = (_quantity(element["valueRange"], side) for side in ("low", "high"))
            self.report.problem(source, "valueRange kept as text (low-high)", where, kept=True)
            return (
                None,
                f"{low[0] if low[0] is not None else ''}-{high[0] if high[0] is not None else ''}",
                (low[1] or high[1]),
            )
        if "valueRatio" in element:
            numerator, denominator = (_quantity(element["valueRatio"], side) for side in ("numerator", "denominator"))
            self.report.problem(source, "valueRatio kept as text (numerator/denominator)", where, kept=True)
            return None, f"{numerator[0]}/{denominator[0]}", None
        if "valuePeriod" in element:
            period = element["valuePeriod"]
            if not isinstance(period, dict):
                raise _Skip("malformed: valuePeriod is not a Period object")
            self.report.problem(source, "valuePeriod kept as text (start/end)", where, kept=True)
            return None, f"{period.get('start', '')}/{period.get('end', '')}", None
        for name in ("valueSampledData", "valueAttachment"):
            if name in element:
                self.report.problem(source, f"{name} not carried (blanked)", where, kept=True)
                return None, None, None
        return None, None, None

    def _medication_use(self, resource: dict, where: str, final: bool) -> None:
        resource_type = resource["resourceType"]
        kind, time_fields = MEDICATION_KINDS[resource_type]
        patient_id = self._subject(resource)
        if "medicationCodeableConcept" in resource:
            code = self._code(resource["medicationCodeableConcept"])
        else:
            medication_id = _reference_id(resource.get("medicationReference"))
            if medication_id is None:
                raise _Skip("no medication")
            if medication_id not in self.medications:
                if not final:
                    self.pending.append((resource, where))
                    return
                self.report.problem(resource_type, "medication reference not found (code UNK)", where, kept=True)
                code = "UNK"
            else:
                code = self.medications[medication_id]
        time = self._time(resource, time_fields)
        if time is None:
            time = self._encounter_time(resource, where, final, "context" if "context" in resource else "encounter")
            if time is None:
                return
        dose = (resource.get("dosage") or {}).get("dose") if resource_type == "MedicationAdministration" else None
        numeric = self._number(dose.get("value"), resource_type, where) if isinstance(dose, dict) else None
        unit = dose.get("unit") if isinstance(dose, dict) else None
        encounter = _reference_id(resource.get("encounter") or resource.get("context"))
        self._emit(patient_id, time, f"MEDICATION//{kind}//{code}", resource_type, numeric, None, unit, encounter)

    def _register_medication(self, resource: dict) -> None:
        medication_id = resource.get("id")
        if not medication_id:
            return
        try:
            self.medications[medication_id] = self._code(resource.get("code"))
        except _Skip:
            identifiers = [i.get("value") for i in resource.get("identifier") or [] if isinstance(i, dict)]
            identifiers = [i for i in identifiers if isinstance(i, str) and i]
            self.medications[medication_id] = f"MIX//{identifiers[0]}" if identifiers else "UNK"

    def _diagnostic_report(self, resource: dict, where: str, final: bool) -> None:
        forms = resource.get("presentedForm") or []
        texts = [_decode_attachment(a) for a in forms]
        if any(text is None and isinstance(a, dict) and a.get("data") for a, text in zip(forms, texts)):
            self.report.problem("DiagnosticReport", "presentedForm not base64 UTF-8 text (blanked)", where, kept=True)
        text = "\n".join(t for t in texts if t) or resource.get("conclusion")
        patient_id = _reference_id(resource.get("subject"))
        if isinstance(text, str) and _digest(text) in self.note_texts.get(patient_id, ()):
            # Synthea writes each note twice, as a DocumentReference and as this report: the NOTE event keeps it
            self.report.carried_elsewhere(
                "DiagnosticReport", "text identical to a note of the patient (kept on the NOTE)"
            )
            text = None
        self._simple(resource, where, final, "REPORT", ("effectiveDateTime", "effectivePeriod", "issued"), text=text)

    def _document(self, resource: dict, where: str, final: bool) -> None:
        patient_id = self._subject(resource)
        code = self._code(resource.get("type"))
        time = self._time(resource, ("date",))
        if time is None:
            time = self._time(resource.get("context") or {}, ("period",))
        if time is None:
            raise _Skip("no time (DocumentReference without date)")
        texts = []
        for content in resource.get("content") or []:
            attachment = content.get("attachment") if isinstance(content, dict) else None
            if attachment:
                decoded = _decode_attachment(attachment)
                if decoded is None and attachment.get("data"):
                    self.report.problem(
                        "DocumentReference", "attachment not base64 UTF-8 text (blanked)", where, kept=True
                    )
                elif decoded is None and attachment.get("url"):
                    self.report.problem(
                        "DocumentReference", "attachment only by url (text not carried)", where, kept=True
                    )
                texts.append(decoded)
        text = "\n".join(t for t in texts if t) or None
        if text is not None:
            self.note_texts.setdefault(patient_id, set()).add(_digest(text))
        encounters = (resource.get("context") or {}).get("encounter") or [None]
        self._emit(
            patient_id, time, f"NOTE//{code}", "DocumentReference", text=text, encounter=_reference_id(encounters[0])
        )

    # ----------------------------------------------------------------------------------------------------------
    # output

    def _flush(self) -> pl.DataFrame:
        rows, self._rows = self._rows, []
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
        rows = []
        for code in codes.to_list():
            parts, found, i = code.split("//"), [], 1
            while i < len(parts):
                j = next((j for j in range(len(parts), i, -1) if "//".join(parts[i:j]) in self.displays), None)
                if j is None:
                    i += 1
                    continue
                found.append(self.displays["//".join(parts[i:j])])
                i = j
            rows.append((code, ": ".join(found) or None, None))
        return pl.DataFrame(
            rows, schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)}, orient="row"
        )

    def subject_map(self) -> pl.DataFrame:
        rows = [
            (stable_subject_id(pid), pid, system, value)
            for pid, identifiers in self.patients.items()
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


def _unpack(document: object, where: str) -> Iterator[tuple[object, str]]:
    """A Bundle → its entries' resources (Patients and Encounters first); a JSON array → its items; else itself."""
    if isinstance(document, list):
        for index, item in enumerate(document):
            yield from _unpack(item, f"{where} item {index}")
    elif isinstance(document, dict) and document.get("resourceType") == "Bundle":
        entries = document.get("entry") or []
        resources = (
            [e.get("resource") if isinstance(e, dict) else e for e in entries] if isinstance(entries, list) else []
        )
        numbered = sorted(enumerate(resources), key=lambda e: _type_priority(_resource_type(e[1])))
        for index, resource in numbered:
            if isinstance(resource, list) or _resource_type(resource) == "Bundle":
                yield from _unpack(resource, f"{where} entry {index}")
            else:  # the common case, without a generator per resource
                yield resource, f"{where} entry {index}"
    else:
        yield document, where


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _resource_type(resource: object) -> str | None:
    if isinstance(resource, dict) and isinstance(resource.get("resourceType"), str):
        return resource["resourceType"]
    return None


def _quantity(container: object, side: str) -> tuple[object, str | None]:
    """(value, unit) of `container[side]`, a Quantity; (None, None) where absent."""
    if not isinstance(container, dict):
        raise _Skip("malformed: a Range or Ratio is not an object")
    quantity = container.get(side)
    if quantity is None:
        return None, None
    if not isinstance(quantity, dict):
        raise _Skip(f"malformed: {side} is not a Quantity object")
    return quantity.get("value"), quantity.get("unit") or quantity.get("code")


US_CORE = {
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race": "RACE",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity": "ETHNICITY",
}


def _us_core_categories(patient: dict) -> dict[str, tuple[str, str | None]]:
    """US Core race and ethnicity: family → (first OMB category code, its display)."""
    found = {}
    for extension in patient.get("extension") or []:
        if not isinstance(extension, dict) or extension.get("url") not in US_CORE:
            continue
        for inner in extension.get("extension") or []:
            coding = inner.get("valueCoding") if isinstance(inner, dict) and inner.get("url") == "ombCategory" else None
            if isinstance(coding, dict) and isinstance(coding.get("code"), str):
                display = coding.get("display") if isinstance(coding.get("display"), str) else None
                found.setdefault(US_CORE[extension["url"]], (coding["code"], display))
    return found


def _entered_in_error(resource: dict) -> bool:
    """FHIR's status (or a Condition's verificationStatus) says the record was made by mistake."""
    if resource.get("status") == "entered-in-error":
        return True
    return _coding_code(resource.get("verificationStatus")) == "entered-in-error"


def _has_value(element: dict) -> bool:
    return any(key.startswith("value") for key in element)


def _decode_attachment(attachment: dict) -> str | None:
    data = attachment.get("data") if isinstance(attachment, dict) else None
    if not data:
        return None
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


_HANDLERS: dict[str, Callable] = {
    "Patient": FhirReader._patient,
    "Encounter": FhirReader._encounter,
    "Condition": FhirReader._condition,
    "Procedure": FhirReader._procedure,
    "Observation": FhirReader._observation,
    "Immunization": FhirReader._immunization,
    "AllergyIntolerance": FhirReader._allergy,
    "DiagnosticReport": FhirReader._diagnostic_report,
    "DocumentReference": FhirReader._document,
    **dict.fromkeys(MEDICATION_KINDS, FhirReader._medication_use),
}
