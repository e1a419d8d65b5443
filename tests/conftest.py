from pathlib import Path

import pytest
import torch

from medstate.data.convert import convert

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


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
    return convert(root, out, "mimic-iv")


@pytest.fixture(scope="session")
def mimic_fhir_meds(tmp_path_factory):
    root = SHARED / "data" / "mimic-iv-demo-fhir-2.1.0" / "fhir"
    if not root.is_dir():
        pytest.skip(f"shared data not found at {root}")
    out = tmp_path_factory.mktemp("mimic-fhir") / "meds"
    # the ED module (Mimic*ED files) has no CSV counterpart in the MIMIC-IV demo: leave it out to compare
    return convert(root, out, "fhir", exclude_files=["*ED.ndjson.gz"])
