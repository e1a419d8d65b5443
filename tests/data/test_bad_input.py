"""Bad input is never silent: lenient mode skips and counts by reason, strict mode stops with one line (exit 2)."""

import gzip
import json

import pytest
from typer.testing import CliRunner

from medstate import MedstateError
from medstate.cli import app
from medstate.data.convert import convert
from medstate.data.csv_stream import TRUNCATED
from tests.data.test_mimic import tiny_mimic, write_csv

runner = CliRunner()


def strict_cli(input, output, format):
    result = runner.invoke(app, ["data", "convert", "--format", format, "--strict", str(input), str(output)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("medstate: error:")]
    assert len(lines) == 1
    assert not output.exists()  # nothing half-written
    return lines[0]


def patient(pid):
    return {"resourceType": "Patient", "id": pid, "gender": "male", "birthDate": "1980-01-01"}


def condition(pid, date="2019-01-01", **extra):
    resource = {
        "resourceType": "Condition",
        "recordedDate": date,
        "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003"}]},
        **extra,
    }
    if pid:
        resource["subject"] = {"reference": f"Patient/{pid}"}
    return resource


def write_ndjson(path, lines, compress=False):
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)


def test_truncated_gzip_csv(tmp_path):
    tiny_mimic(tmp_path / "mimic")
    rows = [f"{i},1,11,7,51214,,2151-03-02 06:00:00,,250,250,mg/dL,,,,ROUTINE," for i in range(20000)]
    path = write_csv(
        tmp_path / "mimic",
        "hosp/labevents",
        "labevent_id,subject_id,hadm_id,specimen_id,itemid,"
        "order_provider_id,charttime,storetime,value,valuenum,valueuom,ref_range_lower,ref_range_upper,"
        "flag,priority,comments",
        *rows,
    )
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    result = convert(tmp_path / "mimic", tmp_path / "out", "mimic-iv")
    (lost,) = result.report.lost_files  # a lost part of a file, not a skipped record
    assert lost["path"].endswith("labevents.csv.gz") and lost["reason"].startswith(TRUNCATED)
    assert lost["bytes"] == len(data) // 2 and 0 <= lost["records_read_before"] < 20000
    labevents = result.report.sources["labevents"]
    assert labevents.read == labevents.converted == lost["records_read_before"] and not labevents.skipped
    assert result.summary.events > 0  # the other tables (and the readable part) are still converted
    message = strict_cli(tmp_path / "mimic", tmp_path / "strict", "mimic-iv")
    assert "labevents.csv.gz" in message and "truncated" in message


def test_invalid_json_lines(tmp_path):
    write_ndjson(tmp_path / "in" / "all.ndjson", [patient("a"), '{"resourceType": "Condition", ', condition("a")])
    result = convert(tmp_path / "in", tmp_path / "out", "fhir")
    assert result.report.sources["(invalid JSON)"].skipped == {"invalid JSON line": 1}
    assert result.report.sources["Condition"].written == 1
    assert "all.ndjson line 2" in strict_cli(tmp_path / "in", tmp_path / "strict", "fhir")


def test_resource_without_subject(tmp_path):
    write_ndjson(tmp_path / "in" / "all.ndjson", [patient("a"), condition(None), condition("a")])
    result = convert(tmp_path / "in", tmp_path / "out", "fhir")
    assert result.report.sources["Condition"].skipped == {"missing subject reference": 1}
    message = strict_cli(tmp_path / "in", tmp_path / "strict", "fhir")
    assert "all.ndjson line 2" in message and "missing subject reference" in message


def test_impossible_dates(tmp_path):
    write_ndjson(tmp_path / "in" / "all.ndjson", [patient("a"), condition("a", "2019-02-29"), condition("a")])
    result = convert(tmp_path / "in", tmp_path / "out", "fhir")
    assert result.report.sources["Condition"].skipped == {"unparseable date in recordedDate": 1}
    assert "line 2" in strict_cli(tmp_path / "in", tmp_path / "strict", "fhir")

    tiny_mimic(tmp_path / "mimic")
    write_csv(
        tmp_path / "mimic",
        "hosp/omr",
        "subject_id,chartdate,seq_num,result_name,result_value",
        "2,2120-04-01,1,BMI (kg/m2),27.5",
        "2,2120-02-30,1,BMI (kg/m2),27.9",
    )
    result = convert(tmp_path / "mimic", tmp_path / "out-mimic", "mimic-iv")
    assert result.report.sources["omr"].skipped == {"unparseable date in chartdate": 1}
    message = strict_cli(tmp_path / "mimic", tmp_path / "strict-mimic", "mimic-iv")
    assert "omr.csv.gz line 3" in message and "chartdate" in message


def test_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    for format, expected in (("mimic-iv", "no MIMIC-IV tables"), ("fhir", "no FHIR files"), ("meds", "no data/")):
        with pytest.raises(MedstateError, match=expected):
            convert(tmp_path / "empty", tmp_path / "out", format)
        result = runner.invoke(app, ["data", "convert", "-f", format, str(tmp_path / "empty"), str(tmp_path / "o")])
        assert result.exit_code == 2 and "Traceback" not in result.output


def test_csv_with_a_missing_column(tmp_path):
    tiny_mimic(tmp_path / "mimic")
    write_csv(
        tmp_path / "mimic",
        "hosp/omr",
        "subject_id,chartdate,seq_num,result_value",
        "2,2120-04-01,1,27.5",
        "2,2120-04-02,1,27.9",
    )
    result = convert(tmp_path / "mimic", tmp_path / "out", "mimic-iv")
    assert result.report.sources["omr"].skipped == {"table skipped: missing column(s) ['result_name']": 2}
    assert result.report.sources["patients"].written > 0
    message = strict_cli(tmp_path / "mimic", tmp_path / "strict", "mimic-iv")
    assert "omr.csv.gz" in message and "result_name" in message


def test_values_that_are_not_numbers_are_blanked_and_counted(tmp_path):
    tiny_mimic(tmp_path / "mimic")
    write_csv(
        tmp_path / "mimic",
        "icu/outputevents",
        "subject_id,hadm_id,stay_id,caregiver_id,charttime,storetime,itemid,value,valueuom",
        "1,11,5,1,2151-03-02 06:00:00,,226559,lots,ml",
    )
    result = convert(tmp_path / "mimic", tmp_path / "out", "mimic-iv")
    assert result.report.sources["outputevents"].coerced == {"value not a number (blanked)": 1}
    assert result.report.sources["outputevents"].written == 1


def test_output_is_protected(tmp_path):
    tiny_mimic(tmp_path / "mimic")
    convert(tmp_path / "mimic", tmp_path / "out", "mimic-iv")
    with pytest.raises(MedstateError, match="not empty"):
        convert(tmp_path / "mimic", tmp_path / "out", "mimic-iv")
    convert(tmp_path / "mimic", tmp_path / "out", "mimic-iv", overwrite=True)
