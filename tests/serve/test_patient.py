"""Streamed predictions against re-encoding the whole history from scratch (`predict_history`, one forward of the
prompted sequences `build_sequence` gives), after every event of demo patients in file order (late events
included), for both prompt layouts and both Mamba versions."""

import polars as pl
import pytest
import torch

from medstate import MedstateError
from medstate.ehr.streaming import StreamEvent
from medstate.serve.patient import PatientStream, predict_history
from medstate.serve.service import stream_frame

from .conftest import COLUMNS, _event, served_model


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
            if i % 10 == 0:  # the kept state itself equals encoding the history from scratch in one pass
                fresh = PatientStream(served, [_event(r) for r in events.head(i).iter_rows(named=True)])
                for ours, theirs in zip(stream.state.ssm + stream.state.conv, fresh.state.ssm + fresh.state.conv):
                    assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-4), (subject, i)
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


def test_a_restored_stream_continues_exactly(prepared_demo, demo_events, tmp_path):
    """Saved state + snapshots and the event log give back the stream (a server restart): its tokens are those of
    the live stream, and it continues to re-encoding's predictions."""
    served = served_model(prepared_demo, tmp_path / "model", "both", 2)
    events = demo_events.filter(pl.col("subject_id") == 10004457).select(COLUMNS)
    stream_events = [_event(r) for r in events.iter_rows(named=True)]
    live = PatientStream(served, recent_snapshots=3, sparse_every=3)
    for event in stream_events[:700]:
        live.add(event)
    restored = PatientStream.restore(served, stream_events[:700], live.state_bytes(), live.snapshot_bytes(),
                                     recent_snapshots=3, sparse_every=3)  # fmt: skip
    assert restored.tokenizer.committed == live.tokenizer.committed and set(restored.snapshots) == set(live.snapshots)
    assert restored.predictions() == live.predictions()
    for event in stream_events[700:760]:
        restored.add(event)
    assert restored.predictions() == pytest.approx(predict_history(served, events.head(760)), abs=2e-5)
    with pytest.raises(MedstateError, match="does not fit"):
        PatientStream.restore(served, stream_events[:10], live.state_bytes(), live.snapshot_bytes())


def test_events_extended_at_once_equal_events_added_one_by_one(prepared_demo, demo_events, tmp_path):
    from datetime import timedelta

    served = served_model(prepared_demo, tmp_path / "model", "both", 1)
    frame = demo_events.filter(pl.col("subject_id") == 10004457).select(COLUMNS).head(400).sort("time")
    events = [_event(r) for r in frame.iter_rows(named=True)]
    one, many = PatientStream(served), PatientStream(served)
    for event in events[:150]:
        one.add(event)
    many.extend(events[:150])
    sent = list(events[:150])
    for start in range(150, 400, 50):
        # each chunk opens with a lab resulted late (before tokens already fed), then goes on in time order
        late = StreamEvent(events[start - 40].time - timedelta(minutes=1), "LAB//50912//mg/dL", 1.0, None)
        chunk = [late, *events[start : start + 50]]
        for event in chunk:
            one.add(event)
        many.extend(chunk)
        sent += chunk
        assert many.tokenizer.committed == one.tokenizer.committed
        for ours, theirs in zip(many.state.ssm + many.state.conv, one.state.ssm + one.state.conv):
            assert torch.allclose(ours, theirs, atol=1e-6, rtol=1e-5)  # (probabilities barely see one early lab)
        assert many.predictions() == pytest.approx(one.predictions(), abs=2e-5)
    assert many.predictions() == pytest.approx(predict_history(served, stream_frame(sent)), abs=2e-5)
