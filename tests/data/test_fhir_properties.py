"""Property: whatever one resource of a valid export is mutated into (wrong types, missing fields, odd dates, huge
strings, bytes that are not UTF-8), lenient conversion never raises, every record is accounted for
(read = converted + skipped + ignored per resource type), and the other resources convert exactly as without it."""

import json
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from medstate.data.convert import convert
from medstate.data.meds import scan_meds
from tests.conftest import assert_every_record_accounted_for
from tests.data.test_fhir import hand_worked_resources

SNOMED = "http://snomed.info/sct"
# resources that no other resource depends on: mutating one may only change its own events
INDEPENDENT = [
    {"resourceType": "Condition", "id": "ca", "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2019-05-01",
     "code": {"coding": [{"system": SNOMED, "code": "38341003"}]}},
    {"resourceType": "Observation", "id": "ob", "subject": {"reference": "Patient/p1"},
     "effectiveDateTime": "2019-05-02T08:00:00", "category": [{"coding": [{"code": "laboratory"}]}],
     "code": {"coding": [{"system": "http://loinc.org", "code": "2345-7"}]},
     "valueQuantity": {"value": 5.4, "unit": "mmol/L"}},
    {"resourceType": "Procedure", "id": "pr", "subject": {"reference": "Patient/p1"},
     "performedPeriod": {"start": "2019-05-03T09:00:00", "end": "2019-05-03T10:00:00"},
     "code": {"coding": [{"system": SNOMED, "code": "80146002"}]}},
    {"resourceType": "MedicationRequest", "id": "mr", "subject": {"reference": "Patient/p1"},
     "authoredOn": "2019-05-04", "medicationCodeableConcept": {"coding": [{"system": SNOMED, "code": "1"}]}},
]  # fmt: skip

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20) | st.sampled_from(["2019-02-29", "0000-00-00", "2019-13-01T25:61:00", "x" * 100_000,
                                               "2019", "2019-05-01T10:00:00+14:00", ""]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=8,
)  # fmt: skip


@st.composite
def mutations(draw):
    index = draw(st.integers(0, len(INDEPENDENT) - 1))
    resource = json.loads(json.dumps(INDEPENDENT[index]))
    kind = draw(st.sampled_from(["replace", "delete", "not utf-8"]))
    # a path into the resource, one to three levels deep through objects and lists
    target, field = resource, draw(st.sampled_from(sorted(k for k in resource if k != "resourceType")))
    for _ in range(2):
        inner = target[field]
        if not inner or not isinstance(inner, (dict, list)) or not draw(st.booleans()):
            break
        target, field = inner, draw(st.sampled_from(sorted(inner) if isinstance(inner, dict) else range(len(inner))))
    if kind == "delete":
        del target[field]
    elif kind == "replace":
        target[field] = draw(json_values)
    line = json.dumps(resource).encode()
    if kind == "not utf-8":
        line = line.replace(b'"', b'"\xff\xfe', 1)
    return index, line


def run(resources_lines: list[bytes]) -> tuple[set, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        (folder / "export.ndjson").write_bytes(b"\n".join(resources_lines) + b"\n")
        result = convert(folder, Path(tmp) / "out", "fhir", workers=0)
        events = scan_meds(Path(tmp) / "out").collect()
        rows = {tuple(r) for r in events.select("time", "code", "numeric_value", "text_value").iter_rows()}
        return rows, result.report.as_dict()


BASE = [json.dumps(r).encode() for r in hand_worked_resources()]


def _observation_with(**value) -> tuple[int, bytes]:
    resource = {k: v for k, v in INDEPENDENT[1].items() if k != "valueQuantity"} | value
    return 1, json.dumps(resource).encode()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
@example(_observation_with(valueQuantity={"value": 1, "unit": ["mg"]}))  # found by hand: a unit that is a list
@example(_observation_with(valueCodeableConcept={"text": 5}))  # a text that is a number
@example(_observation_with(valueQuantity={"value": 2**70}))
def test_a_mutated_resource_never_breaks_the_rest(mutation):
    index, line = mutation
    others = BASE + [json.dumps(r).encode() for i, r in enumerate(INDEPENDENT) if i != index]
    without, _ = run(others)
    mutated, report = run([*others, line])
    assert_every_record_accounted_for(report)
    assert without <= mutated  # every other resource converts exactly as it did
    assert len(mutated - without) <= 1  # the mutated one gives at most its own event
    assert report["lost_files"] == []


def test_events_of_the_independent_resources():
    rows, report = run(BASE + [json.dumps(r).encode() for r in INDEPENDENT])
    codes = {code for _, code, _, _ in rows}
    assert {"DIAGNOSIS//SNOMED//38341003", "PROCEDURE//SNOMED//80146002"} <= codes
    assert report["sources"]["Observation"]["converted"] == 2  # the hand-worked one and this one
