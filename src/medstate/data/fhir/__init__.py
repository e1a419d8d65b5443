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
gets the same id in every run and every
file order; `subject_map()` links them back to Patient.id and each Patient.identifier.

The reader is in three rooms: `files` (which files, and the resources in each), `mapping` (one resource → event
rows, family by family) and `values` (codes, times, references and value forms); `reader` joins them.
"""

from medstate.data.fhir.reader import EXTRA_COLUMNS, FhirReader
from medstate.data.fhir.values import parse_fhir_time, stable_subject_id, time_zone

__all__ = ["EXTRA_COLUMNS", "FhirReader", "parse_fhir_time", "stable_subject_id", "time_zone"]
