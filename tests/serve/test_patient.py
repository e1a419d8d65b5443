"""Streamed predictions against re-encoding the whole history from scratch (`predict_history`, one forward of the
prompted sequences `build_sequence` gives), after every event of demo patients in file order (late events
included), for both prompt layouts and both Mamba versions."""

import shutil

import polars as pl
import pytest
import torch
import yaml

from medstate.data.meds import scan_meds
from medstate.ehr.model import EhrMamba, EhrMambaConfig
from medstate.ehr.prepare import PrepareConfig, at_end_of_day, prepare
from medstate.ehr.streaming import StreamEvent
from medstate.ehr.vocab import Vocabulary
from medstate.serve.patient import PatientStream, ServedModel, predict_history

DEMO = "data/demo/mimic-iv-demo-meds"
COLUMNS = ["time", "code", "numeric_value", "hadm_id"]


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared-demo")
    prepare(DEMO, out, PrepareConfig(max_length=256))
    return out


def served_model(prepared, directory, layout: str, version: int) -> ServedModel:
    torch.manual_seed(version)
    vocab = Vocabulary.load(prepared / "vocab.json")
    model = EhrMamba(EhrMambaConfig(vocab_size=len(vocab), d_model=16, n_layer=2, ssm_version=version, dropout=0.0))
    with torch.no_grad():
        model.classifier[1].weight.mul_(4.0)  # probabilities that move with the history
    model.save_pretrained(directory)
    for name in ("vocab.json", "value_bins.json", "tasks.yaml"):
        shutil.copy(prepared / name, directory / name)
    settings = yaml.safe_load((prepared / "prepare.yaml").read_text())
    (directory / "prepare.yaml").write_text(yaml.safe_dump({**settings, "prompt": layout}))
    return ServedModel.load(directory)


@pytest.fixture(scope="module")
def demo_events():
    return at_end_of_day(scan_meds(DEMO).collect(), PrepareConfig().date_only_codes)


def _event(row: dict) -> StreamEvent:
    key = None if row["hadm_id"] is None else f"hadm_id:{row['hadm_id']}"
    return StreamEvent(row["time"], row["code"], row["numeric_value"], key)


@pytest.mark.parametrize(("layout", "version"), [("both", 1), ("last", 2)])
def test_streamed_predictions_equal_reencoding_after_every_event(prepared_demo, demo_events, tmp_path, layout, version):
    served = served_model(prepared_demo, tmp_path / "model", layout, version)
    assert served.heads() == (["[CLS]"] if layout == "last" else [t.token for t in served.tasks])
    subjects = demo_events["subject_id"].unique(maintain_order=True).to_list()[:2]
    seen, rebuilt = [], 0
    for subject in subjects:
        events = demo_events.filter(pl.col("subject_id") == subject).select(COLUMNS).head(70)
        stream = PatientStream(served)
        for i, row in enumerate(events.iter_rows(named=True), 1):
            rebuilt += stream.add(_event(row)).rebuilt
            streamed, expected = stream.predictions(), predict_history(served, events.head(i))
            assert list(streamed) == [t.name for t in served.tasks]
            for task, p in expected.items():
                assert streamed[task] == pytest.approx(p, abs=2e-5), (subject, i, task)
            seen.append(list(expected.values()))
    spread = torch.tensor(seen).std(0)
    assert float(spread.min()) > 0.01  # the check has teeth: every task's probability moves with the history
    assert rebuilt > 0  # file order has late events (date-only procedures are known at the end of their day)


def test_late_event_is_replayed_from_a_snapshot(prepared_demo, demo_events, tmp_path):
    served = served_model(prepared_demo, tmp_path / "model", "last", 2)
    subject = 10004457  # 7 stays, 1,556 events
    events = demo_events.filter(pl.col("subject_id") == subject).select(COLUMNS).sort("time", maintain_order=True)
    stream = PatientStream(served, recent_snapshots=4, sparse_every=4)
    for row in events.iter_rows(named=True):
        stream.add(_event(row))
    assert stream.tokenizer.visit >= 6 and len(stream.snapshots) >= 4
    fed = len(stream.tokenizer.committed)
    # a lab resulted late: dated inside the third visit from the end
    times = events.filter(pl.col("code") != "MEDS_BIRTH")["time"].drop_nulls()
    late_time = times.max() - (times.max() - times.min()) / 3
    late = pl.DataFrame({"time": [late_time], "code": ["LAB//50912//mg/dL"], "numeric_value": [1.1],
                         "hadm_id": [None]}, schema=events.schema)  # fmt: skip
    before = stream.replayed_tokens
    change = stream.add(_event(late.row(0, named=True)))
    assert change.rebuilt and 0 < change.start < fed
    replayed = stream.replayed_tokens - before
    assert 0 < replayed < fed - 1  # from the snapshot before the late event, not from the start
    expected = predict_history(served, pl.concat([events, late]))
    assert stream.predictions() == pytest.approx(expected, abs=2e-5)
