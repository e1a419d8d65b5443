"""FHIR values and times: the code-system table, stable subject ids, times in one zone, references, codings,
quantities, attachments and the Observation value forms. Plain functions over JSON; imports nothing of the reader."""

from __future__ import annotations

import base64
import binascii
import csv
import datetime as dt
import hashlib
import zoneinfo
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources

from medstate.data.report import ConversionReport
from medstate.errors import MedstateError


class Skip(Exception):
    """A record that cannot become an event; the reason is counted (or raised in strict mode)."""


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


def reference_id(reference: object) -> str | None:
    """'Patient/abc', 'urn:uuid:abc', 'abc' → 'abc' (None when absent or not a literal reference)."""
    if not isinstance(reference, dict) or not isinstance(reference.get("reference"), str):
        return None
    ref = reference["reference"]
    if ref.startswith("urn:uuid:"):
        return ref[9:]
    if "?" in ref:  # a conditional (search) reference cannot be resolved offline
        return None
    return ref.rstrip("/").split("/")[-1] or None


def coding_code(concept: object) -> str | None:
    """The code of a CodeableConcept's first coding that has one (None when there is none)."""
    codings = concept.get("coding") if isinstance(concept, dict) else None
    for coding in codings if isinstance(codings, list) else []:
        if isinstance(coding, dict) and isinstance(coding.get("code"), str) and coding["code"]:
            return coding["code"]
    return None


def digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def quantity(container: object, side: str) -> tuple[object, str | None]:
    """(value, unit) of `container[side]`, a Quantity; (None, None) where absent."""
    if not isinstance(container, dict):
        raise Skip("malformed: a Range or Ratio is not an object")
    found = container.get(side)
    if found is None:
        return None, None
    if not isinstance(found, dict):
        raise Skip(f"malformed: {side} is not a Quantity object")
    return found.get("value"), found.get("unit") or found.get("code")


US_CORE = {
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race": "RACE",
    "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity": "ETHNICITY",
}


def us_core_categories(patient: dict) -> dict[str, tuple[str, str | None]]:
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


def entered_in_error(resource: dict) -> bool:
    """FHIR's status (or a Condition's verificationStatus) says the record was made by mistake."""
    if resource.get("status") == "entered-in-error":
        return True
    return coding_code(resource.get("verificationStatus")) == "entered-in-error"


def has_value(element: dict) -> bool:
    return any(key.startswith("value") for key in element)


def decode_attachment(attachment: dict) -> str | None:
    data = attachment.get("data") if isinstance(attachment, dict) else None
    if not data:
        return None
    try:
        return base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None


def number(value: object, source: str, where: str, report: ConversionReport) -> float | None:
    """A number as given, a numeric string as a float; anything else blanked and counted."""
    if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        report.problem(source, "value not a number (blanked)", where, kept=True)
        return None


def observation_value(
    element: dict, source: str, where: str, report: ConversionReport, known_code: Callable[[object], str | None]
) -> tuple[float | None, str | None, str | None]:
    """(numeric_value, text_value, unit) of an Observation value. Forms kept only in part are counted by reason
    (strict mode stops on them). `known_code`: a concept's code where its system is known, else None."""
    if "valueQuantity" in element:
        value = element["valueQuantity"]
        if not isinstance(value, dict):
            raise Skip("malformed: valueQuantity is not a Quantity object")
        unit = value.get("unit") or value.get("code")
        numeric = number(value.get("value"), source, where, report)
        comparator = value.get("comparator")
        if comparator and numeric is not None:  # a censored value: "<40" is not 40
            report.problem(source, "value with a comparator: number kept, comparator in text_value", where, kept=True)
            return numeric, f"{comparator}{value.get('value')}", unit
        return numeric, None, unit
    if "valueCodeableConcept" in element:
        concept = element["valueCodeableConcept"] or {}
        if not isinstance(concept, dict):
            raise Skip("malformed: valueCodeableConcept is not an object")
        coding = next((c for c in concept.get("coding") or [] if isinstance(c, dict)), {})
        if coding and known_code(concept) is None:
            report.problem(source, "coded answer of an unknown code system: display kept", where, kept=True)
        return None, concept.get("text") or coding.get("display") or coding.get("code"), None
    for name in ("valueString", "valueDateTime", "valueTime", "valueCode"):
        if name in element:
            return None, str(element[name]), None
    if "valueBoolean" in element:
        return None, "true" if element["valueBoolean"] else "false", None
    if "valueInteger" in element:
        return number(element["valueInteger"], source, where, report), None, None
    if "valueRange" in element:
        low, high = (quantity(element["valueRange"], side) for side in ("low", "high"))
        report.problem(source, "valueRange kept as text (low-high)", where, kept=True)
        return (
            None,
            f"{low[0] if low[0] is not None else ''}-{high[0] if high[0] is not None else ''}",
            (low[1] or high[1]),
        )
    if "valueRatio" in element:
        numerator, denominator = (quantity(element["valueRatio"], side) for side in ("numerator", "denominator"))
        report.problem(source, "valueRatio kept as text (numerator/denominator)", where, kept=True)
        return None, f"{numerator[0]}/{denominator[0]}", None
    if "valuePeriod" in element:
        period = element["valuePeriod"]
        if not isinstance(period, dict):
            raise Skip("malformed: valuePeriod is not a Period object")
        report.problem(source, "valuePeriod kept as text (start/end)", where, kept=True)
        return None, f"{period.get('start', '')}/{period.get('end', '')}", None
    for name in ("valueSampledData", "valueAttachment"):
        if name in element:
            report.problem(source, f"{name} not carried (blanked)", where, kept=True)
            return None, None, None
    return None, None, None
