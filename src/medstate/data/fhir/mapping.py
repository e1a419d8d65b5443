"""One FHIR resource → MEDS event rows, family by family (Patient, Encounter, Condition, Procedure, Observation,
the four medication resources, Immunization, AllergyIntolerance, DiagnosticReport, DocumentReference).

A `ResourceMapper` holds what later resources need from earlier ones (encounters' times, Medication codes, the
patients seen, the note texts written, the code displays) and the rows converted so far. A resource that names an
encounter or a medication not read yet is queued (`pending`) and converted again at the end (`final=True`). A
resource that cannot become an event is counted by reason in the report (strict mode stops on it), never raised."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from medstate.data.fhir.files import type_of
from medstate.data.fhir.values import (
    Day,
    Skip,
    coding_code,
    decode_attachment,
    digest,
    entered_in_error,
    has_value,
    load_code_systems,
    number,
    observation_value,
    parse_fhir_time,
    reference_id,
    us_core_categories,
)
from medstate.data.report import ConversionReport

GENDERS = {"female": "F", "male": "M", "other": "O", "unknown": "UNK"}
MEDICATION_KINDS = {
    "MedicationRequest": ("REQUEST", ("authoredOn",)),
    "MedicationAdministration": ("ADMINISTRATION", ("effectiveDateTime", "effectivePeriod")),
    "MedicationDispense": ("DISPENSE", ("whenHandedOver", "whenPrepared")),
    "MedicationStatement": ("STATEMENT", ("effectiveDateTime", "effectivePeriod", "dateAsserted")),
}


class ResourceMapper:
    def __init__(self, report: ConversionReport, zone: dt.tzinfo):
        self.report = report
        self.zone = zone
        self.code_systems = load_code_systems()
        self.encounters: dict[str, tuple[dt.datetime | None, dt.datetime | None]] = {}
        self.medications: dict[str, tuple[str, str]] = {}
        self.patients: dict[str, list[tuple[str | None, str | None]]] = {}
        self.pending: list[tuple[dict, str]] = []
        self.displays: dict[str, str] = {}  # '<vocabulary>//<code>' → the display the export gives it
        self.note_texts: dict[str, set[bytes]] = {}  # Patient.id → digests of the note texts written
        self.rows: list[tuple] = []  # committed events: (patient, time, code, numeric, text, unit, encounter, source,
        # time precision, resource key)
        self._current: list[tuple] = []  # the events of the resource being converted, kept only if it converts
        self._resource: str | None = None

    def take_rows(self) -> list[tuple]:
        """The rows committed since the last call, handed over."""
        rows, self.rows = self.rows, []
        return rows

    def convert(self, resource: object, where: str, final: bool = False) -> None:
        resource_type = type_of(resource)
        if resource_type is None:
            self.report.read("(no resourceType)")
            self.report.counts_conversions("(no resourceType)")
            self.report.problem("(no resourceType)", "not a FHIR resource (no resourceType)", where)
            return
        if not final:
            self.report.read(resource_type)
            self.report.counts_conversions(resource_type)
        where = f"{where} ({resource_type}/{resource.get('id', '?')})"
        handler = HANDLERS.get(resource_type)
        if handler is None:
            if resource_type == "Medication":
                self._register_medication(resource)
            self.report.ignore(resource_type)
            return
        if entered_in_error(resource):
            self.report.left_out(resource_type, "entered in error (status): not a clinical fact")
            return
        self._current = []
        version = (resource.get("meta") or {}).get("versionId") if isinstance(resource.get("meta"), dict) else None
        self._resource = f"{resource_type}/{resource.get('id', '?')}/_history/{version or '-'}"
        waiting = len(self.pending)
        try:
            handler(self, resource, where, final)
        except Skip as skip:
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

    def known_code(self, concept: object) -> str | None:
        """`_code` of a concept, or None where it has no coding of a known system."""
        try:
            return self.code(concept) if isinstance(concept, dict) and concept.get("coding") else None
        except Skip:
            return None

    def _subject(self, resource: dict, field: str = "subject") -> str:
        reference = resource.get(field) or resource.get("patient")
        patient_id = reference_id(reference)
        if patient_id is None:
            raise Skip("missing subject reference")
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
                raise Skip(f"unparseable date in {name}") from None
        return None

    def code(self, concept: object) -> str:
        """'<vocabulary>//<code>' (or the bare code) from the first coding whose system the table knows."""
        if concept is not None and not isinstance(concept, dict):
            raise Skip("malformed: a code is not a CodeableConcept object")
        codings = concept.get("coding") if isinstance(concept, dict) else None
        if codings is not None and not isinstance(codings, list):
            raise Skip("malformed: coding is not a list of Coding objects")
        if not codings:
            text = concept.get("text") if isinstance(concept, dict) else None
            if isinstance(text, str) and text.strip():  # free text only: kept, marked as such
                return f"TEXT//{text.strip()}"
            raise Skip("no code")
        for coding in codings:
            if not isinstance(coding, dict):
                raise Skip("malformed: coding is not a list of Coding objects")
            vocabulary = self.code_systems.get(coding.get("system"))
            code = coding.get("code")
            if vocabulary is not None and isinstance(code, str) and code:
                code = code.replace(".", "") if vocabulary.strip_dots else code
                code = f"{vocabulary.prefix}//{code}" if vocabulary.prefix else code
                if isinstance(coding.get("display"), str) and code not in self.displays:
                    self.displays[code] = coding["display"]
                return code
        raise Skip(f"unknown code system {codings[0].get('system')}")

    def _emit(self, patient_id, time, code, source, numeric=None, text=None, unit=None, encounter=None) -> None:
        for name, value in (("text", text), ("unit", unit), ("encounter reference", encounter)):
            if value is not None and not isinstance(value, str):
                raise Skip(f"malformed: a {name} is not a string")
        precision = "day" if isinstance(time, Day) else None
        if precision:
            time = dt.datetime(time.year, time.month, time.day)
        self._current.append(
            (patient_id, time, code, numeric, text, unit, encounter, source, precision, self._resource)
        )

    def _commit(self) -> None:
        self.rows.extend(self._current)
        self._current = []

    # handlers ------------------------------------------------------------------------------------------------

    def _patient(self, resource: dict, where: str, final: bool) -> None:
        patient_id = resource.get("id")
        if not isinstance(patient_id, str) or not patient_id:
            raise Skip("Patient without id")
        if patient_id in self.patients:
            raise Skip("duplicate Patient")
        identifiers = [
            (i.get("system"), i.get("value")) for i in resource.get("identifier") or [] if isinstance(i, dict)
        ]
        birth = self._time(resource, ("birthDate",))
        death = self._time(resource, ("deceasedDateTime",))
        gender = resource.get("gender")
        gender = GENDERS.get(gender, "UNK") if isinstance(gender, str) or gender is None else "UNK"
        self.patients[patient_id] = identifiers or [(None, None)]
        self._emit(patient_id, None, f"GENDER//{gender}", "Patient")
        for family, (code, display) in us_core_categories(resource).items():  # race, ethnicity (US Core)
            self._emit(patient_id, None, f"{family}//{code}", "Patient", text=display)
        marital = resource.get("maritalStatus")
        if marital is not None:
            status = coding_code(marital)
            if status is None or not isinstance(status, str):
                raise Skip("malformed: maritalStatus has no code")
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
            raise Skip("malformed: period is not a Period object")
        try:
            start = parse_fhir_time(period["start"], self.zone) if period.get("start") else None
            end = parse_fhir_time(period["end"], self.zone) if period.get("end") else None
        except (ValueError, TypeError):
            raise Skip("unparseable date in period") from None
        if start is None and end is None:
            raise Skip("no time (Encounter without period)")
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
            type_code = next((c for c in (self.known_code(t) for t in types) if c), None)
            if type_code is not None:  # the encounter's type, coded (its display stays on ENCOUNTER_START)
                self._emit(patient_id, start, f"ENCOUNTER_TYPE//{type_code}", "Encounter", encounter=encounter_id)
        if end is not None:
            disposition = coding_code((resource.get("hospitalization") or {}).get("dischargeDisposition"))
            self._emit(
                patient_id, end, f"ENCOUNTER_END//{class_code}", "Encounter", text=disposition, encounter=encounter_id
            )

    def _encounter_time(self, resource: dict, where: str, final: bool, field: str = "encounter") -> dt.datetime | None:
        """The end (else start) of the resource's encounter; None and queued when the encounter is not read yet."""
        encounter_id = reference_id(resource.get(field))
        if encounter_id is None:
            raise Skip("no time (no date and no encounter)")
        if encounter_id in self.encounters:
            start, end = self.encounters[encounter_id]
            return end or start
        if final:
            raise Skip("no time (no date, and its encounter was not found)")
        self.pending.append((resource, where))
        return None

    def _condition(self, resource: dict, where: str, final: bool) -> None:
        patient_id = self._subject(resource)
        code = self.code(resource.get("code"))
        time = self._time(resource, ("onsetDateTime", "onsetPeriod", "recordedDate"))
        if time is None:
            time = self._encounter_time(resource, where, final)
            if time is None:
                return
        self._emit(
            patient_id, time, f"DIAGNOSIS//{code}", "Condition", encounter=reference_id(resource.get("encounter"))
        )

    def _procedure(self, resource: dict, where: str, final: bool) -> None:
        self._simple(resource, where, final, "PROCEDURE", ("performedDateTime", "performedPeriod"))

    def _immunization(self, resource: dict, where: str, final: bool) -> None:
        self._simple(resource, where, final, "IMMUNIZATION", ("occurrenceDateTime",), code_field="vaccineCode")

    def _allergy(self, resource: dict, where: str, final: bool) -> None:
        self._simple(resource, where, final, "ALLERGY", ("onsetDateTime", "recordedDate"))

    def _simple(self, resource, where, final, family, time_fields, code_field="code", text=None) -> None:
        patient_id = self._subject(resource)
        code = self.code(resource.get(code_field))
        time = self._time(resource, time_fields)
        if time is None:
            time = self._encounter_time(resource, where, final, "context" if "context" in resource else "encounter")
            if time is None:
                return
        encounter = reference_id(resource.get("encounter") or resource.get("context"))
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
            raise Skip("malformed: category is not a list of CodeableConcept objects")
        categories = {(c.get("code") or "").lower() for concept in concepts for c in (concept.get("coding") or []) if c}
        family = "LAB" if "laboratory" in categories else "VITAL" if "vital-signs" in categories else "OBSERVATION"
        encounter = reference_id(resource.get("encounter"))
        parts = [resource] if has_value(resource) or not resource.get("component") else []
        parts += [c for c in resource.get("component") or [] if isinstance(c, dict)]
        events = []  # all parts are checked before any is emitted: a bad component skips the whole resource
        for part in parts:
            code = self.code(part.get("code"))
            numeric, text, unit = observation_value(part, "Observation", where, self.report, self.known_code)
            answer = self.known_code(part["valueCodeableConcept"]) if "valueCodeableConcept" in part else None
            suffix = f"//{answer}" if answer else f"//{unit}" if unit else ""
            events.append((f"{family}//{code}{suffix}", numeric, text, unit))
        for code, numeric, text, unit in events:
            self._emit(patient_id, time, code, "Observation", numeric, text, unit, encounter)

    def _medication_use(self, resource: dict, where: str, final: bool) -> None:
        resource_type = resource["resourceType"]
        kind, time_fields = MEDICATION_KINDS[resource_type]
        patient_id = self._subject(resource)
        if "medicationCodeableConcept" in resource:
            code = self.code(resource["medicationCodeableConcept"])
        else:
            medication_id = reference_id(resource.get("medicationReference"))
            if medication_id is None:
                raise Skip("no medication")
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
        numeric = number(dose.get("value"), resource_type, where, self.report) if isinstance(dose, dict) else None
        unit = dose.get("unit") if isinstance(dose, dict) else None
        encounter = reference_id(resource.get("encounter") or resource.get("context"))
        self._emit(patient_id, time, f"MEDICATION//{kind}//{code}", resource_type, numeric, None, unit, encounter)

    def _register_medication(self, resource: dict) -> None:
        medication_id = resource.get("id")
        if not medication_id:
            return
        try:
            self.medications[medication_id] = self.code(resource.get("code"))
        except Skip:
            identifiers = [i.get("value") for i in resource.get("identifier") or [] if isinstance(i, dict)]
            identifiers = [i for i in identifiers if isinstance(i, str) and i]
            self.medications[medication_id] = f"MIX//{identifiers[0]}" if identifiers else "UNK"

    def _diagnostic_report(self, resource: dict, where: str, final: bool) -> None:
        forms = resource.get("presentedForm") or []
        texts = [decode_attachment(a) for a in forms]
        if any(text is None and isinstance(a, dict) and a.get("data") for a, text in zip(forms, texts)):
            self.report.problem("DiagnosticReport", "presentedForm not base64 UTF-8 text (blanked)", where, kept=True)
        text = "\n".join(t for t in texts if t) or resource.get("conclusion")
        patient_id = reference_id(resource.get("subject"))
        if isinstance(text, str) and digest(text) in self.note_texts.get(patient_id, ()):
            # Synthea writes each note twice, as a DocumentReference and as this report: the NOTE event keeps it
            self.report.carried_elsewhere(
                "DiagnosticReport", "text identical to a note of the patient (kept on the NOTE)"
            )
            text = None
        self._simple(resource, where, final, "REPORT", ("effectiveDateTime", "effectivePeriod", "issued"), text=text)

    def _document(self, resource: dict, where: str, final: bool) -> None:
        patient_id = self._subject(resource)
        code = self.code(resource.get("type"))
        time = self._time(resource, ("date",))
        if time is None:
            time = self._time(resource.get("context") or {}, ("period",))
        if time is None:
            raise Skip("no time (DocumentReference without date)")
        texts = []
        for content in resource.get("content") or []:
            attachment = content.get("attachment") if isinstance(content, dict) else None
            if attachment:
                decoded = decode_attachment(attachment)
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
            self.note_texts.setdefault(patient_id, set()).add(digest(text))
        encounters = (resource.get("context") or {}).get("encounter") or [None]
        self._emit(
            patient_id, time, f"NOTE//{code}", "DocumentReference", text=text, encounter=reference_id(encounters[0])
        )


HANDLERS: dict[str, Callable] = {
    "Patient": ResourceMapper._patient,
    "Encounter": ResourceMapper._encounter,
    "Condition": ResourceMapper._condition,
    "Procedure": ResourceMapper._procedure,
    "Observation": ResourceMapper._observation,
    "Immunization": ResourceMapper._immunization,
    "AllergyIntolerance": ResourceMapper._allergy,
    "DiagnosticReport": ResourceMapper._diagnostic_report,
    "DocumentReference": ResourceMapper._document,
    **dict.fromkeys(MEDICATION_KINDS, ResourceMapper._medication_use),
}
