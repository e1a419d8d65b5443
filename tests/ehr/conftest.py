import polars as pl
import pytest

from medstate.ehr.prepare import PrepareConfig, prepare
from medstate.ehr.sequences import ARRAYS
from medstate.ehr.store import Samples


@pytest.fixture(scope="session")
def prepared(mimic_csv_meds, tmp_path_factory):
    """The MIMIC-IV demo (converted by the data layer) prepared at 256 tokens."""
    out = tmp_path_factory.mktemp("prepared")
    prepare(mimic_csv_meds.summary.output, out, PrepareConfig(max_length=256))
    return out


def inputs_frame(prepared, kind: str) -> pl.DataFrame:
    """A prepared directory's inputs as one frame: the samples' rows with their token arrays as list columns."""
    samples = Samples.read(prepared, kind)
    arrays = {name: [a[name].tolist() for a in samples.arrays] for name in ARRAYS}
    return samples.frame.with_columns(*(pl.Series(name, values) for name, values in arrays.items()))
