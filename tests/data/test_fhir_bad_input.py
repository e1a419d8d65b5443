"""A corpus of broken and unusual FHIR input, each case in lenient and strict mode: exit code, one-line message,
the good records of the same run still converted, exact counts, and the accounting identity
(read = converted + skipped + ignored, per resource type) on every conversion."""

import gzip
import json

import polars as pl
import pytest
from typer.testing import CliRunner

from medstate.cli import app
from medstate.data.meds import scan_meds
from tests.conftest import assert_every_record_accounted_for

runner = CliRunner()
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"


def patient(pid="a"):
    return {"resourceType": "Patient", "id": pid, "gender": "female", "birthDate": "1980-01-01"}


def condition(cid="c-good", code="38341003", **extra):
    return {"resourceType": "Condition", "id": cid, "subject": {"reference": "Patient/a"}, "recordedDate": "2019-01-01",
            "code": {"coding": [{"system": SNOMED, "code": code}]}, **extra}  # fmt: skip


def observation(oid, **value):
    return {"resourceType": "Observation", "id": oid, "subject": {"reference": "Patient/a"},
            "effectiveDateTime": "2019-02-01T10:00:00", "category": [{"coding": [{"code": "laboratory"}]}],
            "code": {"coding": [{"system": LOINC, "code": "20447-9"}]}, **value}  # fmt: skip


def convert_cli(input, output, strict=False):
    args = ["data", "convert", "-f", "fhir", str(input), str(output)] + (["--strict"] if strict else [])
    result = runner.invoke(app, args)
    assert ("Traceback" not in result.output and result.exception is None) or isinstance(result.exception, SystemExit)
    return result


def lenient_and_strict(tmp_path, name, content):
    """Write the input (a good Patient and Condition plus `content` in file `name`), convert both ways."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.ndjson").write_text(json.dumps(patient()) + "\n" + json.dumps(condition()) + "\n")
    path = folder / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    lenient = convert_cli(folder, tmp_path / "out")
    assert lenient.exit_code == 0, lenient.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert_every_record_accounted_for(report)
    events = scan_meds(tmp_path / "out").collect()
    assert events.filter(pl.col("code") == "DIAGNOSIS//SNOMED//38341003").height == 1  # the good record converted
    strict = convert_cli(folder, tmp_path / "strict", strict=True)
    lines = [line for line in strict.output.splitlines() if line.strip()]
    return report, events, strict.exit_code, lines


def ndjson(*resources):
    return "\n".join(json.dumps(r) for r in resources) + "\n"


MALFORMED = {
    "coding as an object": (
        condition("c-bad", code="x") | {"code": {"coding": {"system": SNOMED, "code": "1"}}},
        "Condition", "malformed: coding is not a list of Coding objects",
    ),
    "period as a string": (
        {"resourceType": "Encounter", "id": "e-bad", "subject": {"reference": "Patient/a"}, "period": "2019-01-01"},
        "Encounter", "malformed: period is not a Period object",
    ),
    "category as a list of strings": (
        observation("o-bad", valueQuantity={"value": 1}) | {"category": ["laboratory"]},
        "Observation", "malformed: category is not a list of CodeableConcept objects",
    ),
    "valueQuantity as a bare number": (
        observation("o-bad", valueQuantity=40), "Observation", "malformed: valueQuantity is not a Quantity object",
    ),
    "subject as a string": (condition("c-bad") | {"subject": "Patient/a"}, "Condition", "missing subject reference"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_resource_is_skipped_and_counted_or_stops_strict_mode(case, tmp_path):
    resource, resource_type, reason = MALFORMED[case]
    report, _, code, lines = lenient_and_strict(tmp_path, "bad.ndjson", ndjson(patient("b"), resource))
    assert report["sources"][resource_type]["skipped"] == {reason: 1}
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medstate: error:")
    assert "bad.ndjson line 2" in lines[0] and f"{resource_type}/{resource['id']}" in lines[0] and reason in lines[0]


REDUCED = {
    "comparator": (observation("o1", valueQuantity={"value": 40, "comparator": "<", "unit": "copies/mL"}),
                   "value with a comparator: number kept, comparator in text_value", (40.0, "<40")),
    "valueRange": (observation("o1", valueRange={"low": {"value": 1, "unit": "mg"}, "high": {"value": 5}}),
                   "valueRange kept as text (low-high)", (None, "1-5")),
    "valueRatio": (observation("o1", valueRatio={"numerator": {"value": 1}, "denominator": {"value": 128}}),
                   "valueRatio kept as text (numerator/denominator)", (None, "1/128")),
    "valuePeriod": (observation("o1", valuePeriod={"start": "2019-01-01", "end": "2019-01-03"}),
                    "valuePeriod kept as text (start/end)", (None, "2019-01-01/2019-01-03")),
    "valueSampledData": (observation("o1", valueSampledData={"origin": {"value": 0}, "data": "1 2 3"}),
                         "valueSampledData not carried (blanked)", (None, None)),
}  # fmt: skip


@pytest.mark.parametrize("case", REDUCED)
def test_a_value_kept_in_part_is_counted(case, tmp_path):
    resource, reason, (numeric, text) = REDUCED[case]
    report, events, code, lines = lenient_and_strict(tmp_path, "obs.ndjson", ndjson(resource))
    assert report["sources"]["Observation"]["coerced"] == {reason: 1}
    assert report["sources"]["Observation"]["converted"] == 1
    lab = events.filter(pl.col("code").str.starts_with("LAB//")).row(0, named=True)
    assert (lab["numeric_value"], lab["text_value"]) == (numeric, text)
    assert code == 2 and len(lines) == 1 and "obs.ndjson line 1" in lines[0] and reason in lines[0]


def note(resource_type, attachment):
    field = {"presentedForm": [attachment]} if resource_type == "DiagnosticReport" else {
        "content": [{"attachment": attachment}]}  # fmt: skip
    code = {"coding": [{"system": LOINC, "code": "11506-3"}]}
    return {"resourceType": resource_type, "id": "n1", "subject": {"reference": "Patient/a"}, "date": "2019-01-01",
            "effectiveDateTime": "2019-01-01", "code": code, "type": code, **field}  # fmt: skip


@pytest.mark.parametrize(
    ("resource", "reason"),
    [
        (note("DiagnosticReport", {"contentType": "text/plain", "data": "not base64!"}),
         "presentedForm not base64 UTF-8 text (blanked)"),
        (note("DocumentReference", {"contentType": "text/plain", "url": "Binary/123"}),
         "attachment only by url (text not carried)"),
    ],
)  # fmt: skip
def test_note_text_lost_is_counted(resource, reason, tmp_path):
    report, _, code, lines = lenient_and_strict(tmp_path, "notes.ndjson", ndjson(resource))
    assert report["sources"][resource["resourceType"]]["coerced"] == {reason: 1}
    assert code == 2 and reason in lines[0]


def bundle(*resources):
    return {"resourceType": "Bundle", "type": "collection", "entry": [{"resource": r} for r in resources]}


READABLE = {
    "a byte-order mark": ("bom.json", b"\xef\xbb\xbf" + json.dumps(bundle(condition("c2", "59621000"))).encode()),
    "a byte-order mark on NDJSON": ("bom.ndjson", b"\xef\xbb\xbf" + ndjson(condition("c2", "59621000")).encode()),
    "a JSON array of resources": ("array.json", json.dumps([condition("c2", "59621000")])),
    "a Bundle on an NDJSON line": ("lines.ndjson", ndjson(bundle(condition("c2", "59621000")))),
}


@pytest.mark.parametrize("case", READABLE)
def test_readable_shapes_are_read(case, tmp_path):
    name, content = READABLE[case]
    report, events, code, lines = lenient_and_strict(tmp_path, name, content)
    assert events.filter(pl.col("code") == "DIAGNOSIS//SNOMED//59621000").height == 1
    assert report["sources"]["Condition"] == {"read": 2, "converted": 2, "written": 2, "skipped": {}, "coerced": {},
                                              "duplicates_merged": 0}  # fmt: skip
    assert report["lost_files"] == [] and code == 0, lines


def test_truncated_files_are_lost_files_not_one_record(tmp_path):
    text = json.dumps(bundle(*[condition(f"c{i}", "59621000", recordedDate=f"2019-01-{i:02d}") for i in range(1, 21)]))
    report, _, code, lines = lenient_and_strict(tmp_path, "cut.json", text[: len(text) // 2])
    assert len(report["lost_files"]) == 1
    lost = report["lost_files"][0]
    assert lost["path"].endswith("cut.json") and lost["bytes"] == len(text) // 2
    assert lost["records_read_before"] == 0 and 5 <= lost["records_in_file_estimated"] <= 20
    assert report["totals"]["skipped"] == 0  # a lost file is not a skipped record
    assert code == 2 and "cut.json" in lines[0] and "not valid JSON" in lines[0]


def test_truncated_gzip_keeps_what_it_read_and_lists_the_file(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    lines_in = [patient()] + [condition(f"c{i}", recordedDate=f"2019-01-{1 + i % 28:02d}") for i in range(2000)]
    data = gzip.compress(ndjson(*lines_in).encode())
    (folder / "Condition.ndjson.gz").write_bytes(data[: len(data) - 40])
    result = convert_cli(folder, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    (lost,) = report["lost_files"]
    assert result.exit_code == 0 and "unreadable or truncated" in lost["reason"]
    assert report["sources"]["Condition"]["converted"] == lost["records_read_before"] - 1 > 1000
    strict = convert_cli(folder, tmp_path / "strict", strict=True)
    assert strict.exit_code == 2 and "Condition.ndjson.gz" in strict.output


# --- never delete what medstate did not write ------------------------------------------------------------------


@pytest.fixture
def fhir_input(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "good.ndjson").write_text(ndjson(patient(), condition()))
    return folder


def one_line_error(result, *words):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and lines[0].startswith("medstate: error:"), result.output
    assert all(word in lines[0] for word in words), lines[0]


def test_output_that_is_a_file(fhir_input, tmp_path):
    (tmp_path / "out.txt").write_text("mine")
    one_line_error(convert_cli(fhir_input, tmp_path / "out.txt"), "is a file")
    assert (tmp_path / "out.txt").read_text() == "mine"


def test_overwrite_never_deletes_an_unrelated_file(fhir_input, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "thesis.docx").write_text("mine")
    one_line_error(runner.invoke(app, ["data", "convert", "-f", "fhir", str(fhir_input), str(tmp_path / "out"),
                                       "--overwrite"]), "medstate did not write")  # fmt: skip
    assert (tmp_path / "out" / "thesis.docx").read_text() == "mine"
    # a directory medstate wrote is replaced, but not once something foreign is put into it
    assert convert_cli(fhir_input, tmp_path / "ours").exit_code == 0
    args = ["data", "convert", "-f", "fhir", str(fhir_input), str(tmp_path / "ours"), "--overwrite"]
    assert runner.invoke(app, args).exit_code == 0
    (tmp_path / "ours" / "notes.txt").write_text("mine")
    one_line_error(runner.invoke(app, args), "notes.txt")
    assert (tmp_path / "ours" / "notes.txt").is_file()


def test_output_equal_to_inside_or_around_the_input(fhir_input, tmp_path):
    before = sorted(p.name for p in fhir_input.iterdir())
    args = ["data", "convert", "-f", "fhir", str(fhir_input)]
    one_line_error(runner.invoke(app, [*args, str(fhir_input), "--overwrite"]), "input")
    one_line_error(runner.invoke(app, [*args, str(fhir_input / "meds")]), "inside")
    one_line_error(runner.invoke(app, [*args, str(tmp_path), "--overwrite"]), "input")
    assert sorted(p.name for p in fhir_input.iterdir()) == before and (fhir_input / "good.ndjson").is_file()


def test_a_partial_directory_medstate_did_not_write_is_kept(fhir_input, tmp_path):
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "draft.txt").write_text("mine")
    one_line_error(convert_cli(fhir_input, tmp_path / "out"), "out.partial")
    assert (tmp_path / "out.partial" / "draft.txt").read_text() == "mine"


def test_entered_in_error_records_are_left_out_and_counted(tmp_path):
    wrong = condition("c-wrong", "59621000") | {"verificationStatus": {"coding": [{"code": "entered-in-error"}]}}
    medication = {"coding": [{"system": SNOMED, "code": "1"}]}
    order = {"resourceType": "MedicationRequest", "id": "m", "status": "entered-in-error", "authoredOn": "2019-01-02",
             "subject": {"reference": "Patient/a"}, "medicationCodeableConcept": medication}  # fmt: skip
    report, events, code, lines = lenient_and_strict(tmp_path, "errors.ndjson", ndjson(wrong, order))
    reason = "entered in error (status): not a clinical fact"
    assert report["sources"]["Condition"]["skipped"] == {reason: 1}
    assert report["sources"]["MedicationRequest"]["skipped"] == {reason: 1}
    assert events.filter(pl.col("code").str.contains("59621000|MEDICATION")).height == 0
    assert code == 0, lines  # the input is not at fault: strict mode goes on
