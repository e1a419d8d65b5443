import json
from pathlib import Path

import pytest
import torch

from medstate.data.convert import convert

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def assert_every_record_accounted_for(report: dict) -> None:
    """The conversion identity: per source whose reader counts records, read = converted + skipped + ignored."""
    for name, counts in report["sources"].items():
        if counts["converted"] is not None:
            accounted = counts["converted"] + sum(counts["skipped"].values()) + report["ignored"].get(name, 0)
            assert counts["read"] == accounted, (name, counts)
    assert all(counts["converted"] is not None for counts in report["sources"].values()), "a reader counts no records"


@pytest.fixture(autouse=True)
def _every_conversion_accounts_for_its_records(request):
    """After each test, every report.json a conversion wrote under its tmp_path satisfies the identity."""
    yield
    folder = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    for path in folder.rglob("report.json") if folder else ():
        assert_every_record_accounted_for(json.loads(path.read_text()))


@pytest.fixture
def shared_data() -> Path:
    path = SHARED / "data"
    if not path.is_dir():
        pytest.skip(f"shared data not found at {path} (present in CI and on developer machines)")
    return path


# conversions of the shared datasets, done once per test session (each takes seconds)


@pytest.fixture(scope="session")
def mimic_csv_meds(tmp_path_factory):
    root = SHARED / "data" / "mimic-iv-demo-2.2"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    out = tmp_path_factory.mktemp("mimic") / "meds"
    result = convert(root, out, "mimic-iv")
    assert_every_record_accounted_for(result.report.as_dict())
    return result


@pytest.fixture(scope="session")
def mimic_fhir_meds(tmp_path_factory):
    root = SHARED / "data" / "mimic-iv-demo-fhir-2.1.0" / "fhir"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    out = tmp_path_factory.mktemp("mimic-fhir") / "meds"
    # the ED module (Mimic*ED files) has no CSV counterpart in the MIMIC-IV demo: leave it out to compare
    result = convert(root, out, "fhir", exclude_files=["*ED.ndjson.gz"])
    assert_every_record_accounted_for(result.report.as_dict())
    return result


@pytest.fixture(scope="session")
def synthea_bulk_meds(tmp_path_factory):
    """The 13-patient Synthea bulk export (with its 1,215 visit notes) converted to MEDS."""
    root = SHARED / "data" / "synthea-bulk-ndjson-10"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    result = convert(root, tmp_path_factory.mktemp("synthea-bulk") / "meds", "fhir")
    assert_every_record_accounted_for(result.report.as_dict())
    return result
