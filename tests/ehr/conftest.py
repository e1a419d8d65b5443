import pytest

from medstate.ehr.prepare import PrepareConfig, prepare


@pytest.fixture(scope="session")
def prepared(mimic_csv_meds, tmp_path_factory):
    """The MIMIC-IV demo (converted by the data layer) prepared at 256 tokens."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(mimic_csv_meds.summary.output, out, PrepareConfig(max_length=256))
    return out
