"""FHIR R4 → MEDS: hand-worked resources, Synthea bundles, and agreement with the MIMIC-IV CSV reader."""

import base64
import json
from datetime import datetime

import polars as pl
import pytest

from medstate.data.convert import convert
from medstate.data.fhir import parse_fhir_time, stable_subject_id, time_zone
from medstate.data.meds import scan_meds

ICD10 = "http://hl7.org/fhir/sid/icd-10-cm"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
DISPOSITION = "http://terminology.hl7.org/CodeSystem/discharge-disposition"


def coded(system, code, display=None):
    return {"coding": [{"system": system, "code": code, **({"display": display} if display else {})}]}


def bundle(*resources):
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


def hand_worked_resources():
    note = base64.b64encode(b"Chest pain, resolved.").decode()
    return [
        # the Condition comes before its Encounter: it is dated once the encounter is read
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "code": coded(ICD10, "I50.9"),
        },
        {
            "resourceType": "Patient",
            "id": "p1",
            "gender": "female",
            "birthDate": "1950-06-15",
            "deceasedDateTime": "2020-01-02T03:04:05-05:00",
            "identifier": [{"system": "urn:mrn", "value": "MRN1"}],
        },
        {
            "resourceType": "Encounter",
            "id": "e1",
            "subject": {"reference": "Patient/p1"},
            "class": {"code": "IMP"},
            "period": {"start": "2019-12-30T10:00:00-05:00", "end": "2020-01-01T12:00:00-05:00"},
            "hospitalization": {"dischargeDisposition": coded(DISPOSITION, "exp")},
        },
        {
            "resourceType": "Procedure",
            "id": "pr1",
            "subject": {"reference": "Patient/p1"},
            "code": coded(SNOMED, "80146002"),
            "performedPeriod": {"start": "2019-12-30T13:00:00-05:00", "end": "2019-12-30T14:30:00-05:00"},
        },
        {
            "resourceType": "Condition",
            "id": "c2",
            "subject": {"reference": "Patient/p1"},
            "encounter": {"reference": "Encounter/e1"},
            "code": coded(ICD10, "E78.5"),
            "onsetDateTime": "2019-12-15",
            "recordedDate": "2019-12-30T10:30:00-05:00",
        },
        {
            "resourceType": "Observation",
            "id": "o1",
            "subject": {"reference": "Patient/p1"},
            "category": [{"coding": [{"code": "vital-signs"}]}],
            "code": coded(LOINC, "85354-9"),
            "effectiveDateTime": "2019-12-30T11:00:00-05:00",
            "component": [
                {"code": coded(LOINC, "8480-6"), "valueQuantity": {"value": 120, "unit": "mm[Hg]"}},
                {"code": coded(LOINC, "8462-4"), "valueQuantity": {"value": 80, "unit": "mm[Hg]"}},
            ],
        },
        {
            "resourceType": "MedicationRequest",
            "id": "m1",
            "subject": {"reference": "Patient/p1"},
            "medicationReference": {"reference": "Medication/med1"},
            "authoredOn": "2019-12-31",
        },
        {
            "resourceType": "Medication",
            "id": "med1",
            "code": coded("http://www.nlm.nih.gov/research/umls/rxnorm", "197361"),
        },
        {
            "resourceType": "DocumentReference",
            "id": "d1",
            "subject": {"reference": "Patient/p1"},
            "type": coded(LOINC, "11506-3"),
            "date": "2020-01-01T09:00:00Z",
            "content": [{"attachment": {"contentType": "text/plain", "data": note}}],
        },
        {"resourceType": "Organization", "id": "org1"},
    ]


def test_hand_worked_resources(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p1.json").write_text(json.dumps(bundle(*hand_worked_resources())))
    result = convert(tmp_path / "in", tmp_path / "out", "fhir")
    events = scan_meds(tmp_path / "out").collect()
    sid = stable_subject_id("p1")
    assert set(events["subject_id"]) == {sid}
    got = {(r["time"], r["code"], r["numeric_value"], r["text_value"]) for r in events.iter_rows(named=True)}
    t = datetime
    assert got == {
        (None, "GENDER//F", None, None),
        (t(1950, 6, 15), "MEDS_BIRTH", None, None),
        (t(2020, 1, 2, 8, 4, 5), "MEDS_DEATH", None, None),  # 03:04:05-05:00 in UTC
        (t(2019, 12, 30, 15), "ENCOUNTER_START//IMP", None, None),
        (t(2020, 1, 1, 17), "ENCOUNTER_END//IMP", None, "exp"),  # the discharge disposition: expired
        (t(2019, 12, 30, 18), "PROCEDURE//SNOMED//80146002", None, None),  # a Period gives its start
        (t(2019, 12, 15), "DIAGNOSIS//ICD//10//E785", None, None),  # the onset, not the recorded date
        (t(2020, 1, 1, 17), "DIAGNOSIS//ICD//10//I509", None, None),  # no onset: its encounter's end; dots gone
        (t(2019, 12, 30, 16), "VITAL//LOINC//8480-6//mm[Hg]", 120.0, None),  # one event per component
        (t(2019, 12, 30, 16), "VITAL//LOINC//8462-4//mm[Hg]", 80.0, None),
        (t(2019, 12, 31), "MEDICATION//REQUEST//RXNORM//197361", None, None),  # reference resolved afterwards
        (t(2020, 1, 1, 9), "NOTE//LOINC//11506-3", None, "Chest pain, resolved."),  # base64 decoded
    }
    day_only = set(events.filter(pl.col("time_precision") == "day")["code"])
    assert day_only == {"MEDS_BIRTH", "DIAGNOSIS//ICD//10//E785", "MEDICATION//REQUEST//RXNORM//197361"}  # dates
    subject_map = pl.read_parquet(tmp_path / "out" / "metadata" / "subject_map.parquet")
    assert subject_map.rows() == [(sid, "p1", "urn:mrn", "MRN1")]
    assert result.report.total_skipped == 0 and result.report.ignored == {"Organization": 1, "Medication": 1}


def test_icd9_condition_matches_the_mimic_csv_code(tmp_path):
    ndjson = tmp_path / "in" / "Condition.ndjson"
    ndjson.parent.mkdir()
    condition = {
        "resourceType": "Condition",
        "subject": {"reference": "Patient/x"},
        "recordedDate": "2100-01-01",
        "code": coded("http://hl7.org/fhir/sid/icd-9-cm", "428.0"),
    }
    ndjson.write_text(json.dumps(condition) + "\n")
    convert(tmp_path / "in", tmp_path / "out", "fhir")
    assert scan_meds(tmp_path / "out").collect()["code"].to_list() == ["DIAGNOSIS//ICD//9//4280"]


def test_time_parsing():
    assert parse_fhir_time("2020") == datetime(2020, 1, 1)
    assert parse_fhir_time("2020-02") == datetime(2020, 2, 1)
    assert parse_fhir_time("2020-02-29T23:59:58.123+02:00") == datetime(2020, 2, 29, 21, 59, 58, 123000)  # in UTC
    assert parse_fhir_time("2020-02-29T23:59:58Z") == datetime(2020, 2, 29, 23, 59, 58)
    assert parse_fhir_time("2020-02-29T23:59:58") == datetime(2020, 2, 29, 23, 59, 58)  # naive: read as UTC
    new_york = time_zone("America/New_York")
    assert parse_fhir_time("2020-07-01T12:00:00Z", new_york) == datetime(2020, 7, 1, 8)  # EDT, -04:00
    assert parse_fhir_time("2020-01-01T12:00:00Z", new_york) == datetime(2020, 1, 1, 7)  # EST, -05:00
    assert parse_fhir_time("2020-01-01T12:00:00", new_york) == datetime(2020, 1, 1, 12)
    with pytest.raises(ValueError):
        parse_fhir_time("2019-02-29")


def test_synthea_bundles(shared_data, tmp_path):
    result = convert(shared_data / "synthea-fhir-r4-smart", tmp_path / "out", "fhir")
    report = result.report
    assert report.total_skipped == 0
    assert result.summary.subjects == 615
    events = scan_meds(tmp_path / "out").collect()
    assert events.filter(pl.col("code") == "MEDS_DEATH").height == 124
    assert events.filter(pl.col("code") == "MEDS_BIRTH").height == 615
    # every Encounter (18,098 in the set: AMB 16,537, EMER 940, IMP 621) starts and ends with its class
    starts = events.filter(pl.col("code").str.starts_with("ENCOUNTER_START//"))
    ends = events.filter(pl.col("code").str.starts_with("ENCOUNTER_END//"))
    assert starts.height == ends.height == report.sources["Encounter"].read == 18_098
    assert starts.group_by("code").len().sort("code").rows() == [
        ("ENCOUNTER_START//AMB", 16_537),
        ("ENCOUNTER_START//EMER", 940),
        ("ENCOUNTER_START//IMP", 621),
    ]
    assert starts["encounter_id"].n_unique() == 18_098
    for resource_type in ("Condition", "Procedure", "Immunization", "MedicationRequest", "AllergyIntolerance"):
        counts = report.sources[resource_type]
        assert counts.written + counts.duplicates_merged == counts.read, resource_type


def test_mimic_fhir_agrees_with_the_csv_reader(mimic_fhir_meds, mimic_csv_meds):
    fhir_root, csv_root = mimic_fhir_meds.summary.output, mimic_csv_meds.summary.output
    subject_map = pl.read_parquet(fhir_root / "metadata" / "subject_map.parquet").filter(
        pl.col("identifier_system") == "http://mimic.mit.edu/fhir/mimic/identifier/patient"
    )
    assert subject_map.height == 100
    to_mimic = subject_map.select("subject_id", pl.col("identifier_value").cast(pl.Int64).alias("mimic_id"))
    fhir = scan_meds(fhir_root).collect().join(to_mimic, on="subject_id").drop("subject_id")
    fhir = fhir.rename({"mimic_id": "subject_id"})
    csv = scan_meds(csv_root).collect()

    def diagnoses(frame):
        rows = frame.filter(pl.col("code").str.starts_with("DIAGNOSIS//"))
        return rows.group_by("subject_id").agg(pl.col("code").unique())

    both = diagnoses(csv).join(diagnoses(fhir), on="subject_id", how="full", coalesce=True, suffix="_fhir")
    both = both.with_columns(pl.col("code", "code_fhir").fill_null([]))
    jaccard = both.select(
        (
            pl.col("code").list.set_intersection("code_fhir").list.len()
            / pl.col("code").list.set_union("code_fhir").list.len()
        ).mean()
    ).item()
    print(f"mean per-subject Jaccard of DIAGNOSIS codes, FHIR vs CSV: {jaccard:.4f}")
    assert jaccard == 1.0  # the exactness reached: every subject's diagnoses agree

    def facts(frame, code):
        return dict(frame.filter(pl.col("code") == code).select("subject_id", "time").iter_rows())

    # the FHIR export carries a full birth date (the CSV only a year) and the date of death (the CSV adds the
    # in-hospital time): the same facts at the precision both hold
    csv_birth, fhir_birth = facts(csv, "MEDS_BIRTH"), facts(fhir, "MEDS_BIRTH")
    assert csv_birth.keys() == fhir_birth.keys() and len(csv_birth) == 100
    assert all(csv_birth[s].year == fhir_birth[s].year for s in csv_birth)
    csv_death, fhir_death = facts(csv, "MEDS_DEATH"), facts(fhir, "MEDS_DEATH")
    assert csv_death.keys() == fhir_death.keys() and len(csv_death) == 31
    assert all(csv_death[s].date() == fhir_death[s].date() for s in csv_death)


def test_gzipped_ndjson_bulk_export(shared_data, tmp_path):
    result = convert(shared_data / "synthea-bulk-ndjson-10", tmp_path / "out", "fhir")
    events = scan_meds(tmp_path / "out").collect()
    notes = events.filter(pl.col("code").str.starts_with("NOTE//"))
    assert notes.height == result.report.sources["DocumentReference"].read == 1215
    assert notes["text_value"].null_count() == 0 and notes["text_value"].str.len_chars().min() > 20
    assert result.summary.subjects == 13
    # the bulk-export log is not a FHIR resource: counted, not silently passed over
    assert result.report.sources["(no resourceType)"].skipped


def test_mixed_offsets_never_reorder_a_patients_events(tmp_path):
    """An encounter at 22:00-05:00 (03:00 UTC the next day) and its lab at 03:30Z: by wall clock the lab would
    come 19 hours before the encounter that ordered it."""
    resources = [
        {"resourceType": "Patient", "id": "p", "birthDate": "1970-01-01"},
        {"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/p"}, "class": {"code": "EMER"},
         "period": {"start": "2020-01-01T22:00:00-05:00", "end": "2020-01-02T01:00:00-05:00"}},
        {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"},
         "effectiveDateTime": "2020-01-02T03:30:00Z", "code": coded(LOINC, "2345-7"),
         "valueQuantity": {"value": 5.0, "unit": "mmol/L"}},
    ]  # fmt: skip
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.json").write_text(json.dumps(bundle(*resources)))
    convert(tmp_path / "in", tmp_path / "utc", "fhir")
    events = scan_meds(tmp_path / "utc").collect().drop_nulls("time").filter(pl.col("code") != "MEDS_BIRTH")
    assert events["code"].to_list() == ["ENCOUNTER_START//EMER", "OBSERVATION//LOINC//2345-7//mmol/L",
                                        "ENCOUNTER_END//EMER"]  # fmt: skip
    assert events["time"].to_list() == [datetime(2020, 1, 2, 3), datetime(2020, 1, 2, 3, 30), datetime(2020, 1, 2, 6)]
    dataset = json.loads((tmp_path / "utc" / "metadata" / "dataset.json").read_text())
    assert dataset["time_zone"].startswith("UTC")
    convert(tmp_path / "in", tmp_path / "ny", "fhir", timezone="America/New_York")
    local = scan_meds(tmp_path / "ny").collect().drop_nulls("time").filter(pl.col("code") != "MEDS_BIRTH")
    assert local["time"].to_list() == [datetime(2020, 1, 1, 22), datetime(2020, 1, 1, 22, 30), datetime(2020, 1, 2, 1)]


def test_what_a_model_needs_is_carried_as_codes(tmp_path):
    """Race and ethnicity (US Core) and marital status as static facts, a coded answer in the event code, the
    encounter type as an event, displays as code descriptions, and a note written twice carried once."""
    race = {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race",
        "extension": [
            {
                "url": "ombCategory",
                "valueCoding": {"system": "urn:oid:2.16.840.1.113883.6.238", "code": "2106-3", "display": "White"},
            },
            {"url": "text", "valueString": "White"},
        ],
    }
    ethnicity = {
        "url": "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity",
        "extension": [{"url": "ombCategory", "valueCoding": {"code": "2186-5", "display": "Not Hispanic or Latino"}}],
    }
    text = base64.b64encode(b"Follow-up in two weeks.").decode()
    resources = [
        {"resourceType": "Patient", "id": "p", "extension": [race, ethnicity],
         "maritalStatus": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                                       "code": "M"}]}},
        {"resourceType": "Encounter", "id": "e", "subject": {"reference": "Patient/p"}, "class": {"code": "AMB"},
         "type": [coded(SNOMED, "185349003", "Encounter for check up")],
         "period": {"start": "2020-01-01T10:00:00Z", "end": "2020-01-01T11:00:00Z"}},
        {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/p"},
         "effectiveDateTime": "2020-01-01T10:30:00Z", "code": coded(LOINC, "72166-2", "Tobacco smoking status"),
         "valueCodeableConcept": coded(SNOMED, "266919005", "Never smoker")},
        {"resourceType": "DiagnosticReport", "id": "r", "subject": {"reference": "Patient/p"},
         "effectiveDateTime": "2020-01-01T10:40:00Z", "code": coded(LOINC, "34117-2"),
         "presentedForm": [{"contentType": "text/plain", "data": text}]},
        {"resourceType": "DocumentReference", "id": "d", "subject": {"reference": "Patient/p"},
         "date": "2020-01-01T10:40:00Z", "type": coded(LOINC, "34117-2"),
         "content": [{"attachment": {"contentType": "text/plain", "data": text}}]},
    ]  # fmt: skip
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "p.json").write_text(json.dumps(bundle(*resources)))
    result = convert(tmp_path / "in", tmp_path / "out", "fhir")
    events = scan_meds(tmp_path / "out").collect()
    got = {(r["time"], r["code"], r["text_value"]) for r in events.iter_rows(named=True)}
    t = datetime
    assert got == {
        (None, "GENDER//UNK", None),
        (None, "RACE//2106-3", "White"),
        (None, "ETHNICITY//2186-5", "Not Hispanic or Latino"),
        (None, "MARITAL_STATUS//M", None),
        (t(2020, 1, 1, 10), "ENCOUNTER_START//AMB", "Encounter for check up"),
        (t(2020, 1, 1, 10), "ENCOUNTER_TYPE//SNOMED//185349003", None),
        (t(2020, 1, 1, 11), "ENCOUNTER_END//AMB", None),
        (t(2020, 1, 1, 10, 30), "OBSERVATION//LOINC//72166-2//SNOMED//266919005", "Never smoker"),
        (t(2020, 1, 1, 10, 40), "NOTE//LOINC//34117-2", "Follow-up in two weeks."),
        (t(2020, 1, 1, 10, 40), "REPORT//LOINC//34117-2", None),  # the same text, carried once, on the NOTE
    }
    assert result.report.sources["DiagnosticReport"].coerced == {
        "text identical to a note of the patient (kept on the NOTE)": 1
    }
    codes = pl.read_parquet(tmp_path / "out" / "metadata" / "codes.parquet")
    described = dict(zip(codes["code"], codes["description"]))
    assert described["ENCOUNTER_TYPE//SNOMED//185349003"] == "Encounter for check up"
    strict = convert(tmp_path / "in", tmp_path / "strict", "fhir", strict=True)  # nothing here is lost
    assert strict.summary.events == result.summary.events
    assert described["OBSERVATION//LOINC//72166-2//SNOMED//266919005"] == "Tobacco smoking status: Never smoker"
