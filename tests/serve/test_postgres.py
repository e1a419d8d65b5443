"""PostgreSQL: two service instances sharing patients. Each ingest locks the patient's row, an instance whose
cached stream is behind the log restores it from the database, and concurrent ingests to one patient are applied
once each, in one order, with the predictions of re-encoding that order."""

import threading

import pytest

from medstate.serve.patient import predict_history
from medstate.serve.service import IncomingEvent, open_service
from medstate.serve.store import Principal, open_store

from .conftest import served_model

pytest.importorskip("psycopg")


def _events(demo_events, subject, n):
    import polars as pl

    frame = demo_events.filter(pl.col("subject_id") == subject).head(n)
    rows = frame.select("time", "code", "numeric_value", "hadm_id").iter_rows()
    return [IncomingEvent(f"{subject}-{i}", t, c, None if v is None else float(v), None if h is None else str(h))
            for i, (t, c, v, h) in enumerate(rows)]  # fmt: skip


def _frame(events):
    import polars as pl

    return pl.DataFrame(
        {"time": [e.time for e in events], "code": [e.code for e in events],
         "numeric_value": [e.numeric_value for e in events], "hadm_id": [e.hadm_id for e in events]},
        schema={"time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64, "hadm_id": pl.String},
    )  # fmt: skip


def test_two_instances_share_patients(postgres_url, prepared_demo, demo_events, tmp_path):
    model_dir = tmp_path / "model"
    served_model(prepared_demo, model_dir, "last", 1)
    store = open_store(postgres_url)
    principal = Principal("instances", frozenset({"ingest", "read"}))  # (the app looks it up from a token)
    a, b = open_service(model_dir, postgres_url), open_service(model_dir, postgres_url)
    events = _events(demo_events, 10004457, 90)
    a.ingest(principal, "p1", events[:40])
    b.ingest(principal, "p1", events[30:60])  # b has no stream cached: restores it; 30..39 are duplicates
    result = a.ingest(principal, "p1", events[60:90])  # a's cached stream is behind: restored from the database
    assert (result.applied, result.events) == (30, 90)
    expected = predict_history(a.served, _frame(events))
    assert result.predictions == pytest.approx(expected, abs=2e-5)
    assert b.predictions(principal, "p1")["predictions"] == pytest.approx(expected, abs=2e-5)

    # concurrent ingests to one patient from both instances: serialized by the row lock, each event once
    more = _events(demo_events, 10002930, 60)
    threads = [threading.Thread(target=service.ingest, args=(principal, "p2", part))
               for service, part in ((a, more[:30]), (b, more[30:]), (a, more[10:40]), (b, more[:5]))]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with store.transaction() as db:
        keys = [k for (k,) in db.execute("SELECT event_key FROM events WHERE patient_id = ? ORDER BY seq", ("p2",))]
    assert sorted(keys) == sorted(e.key for e in more)
    order = {e.key: e for e in more}
    applied = [order[k] for k in keys]
    final = a.predictions(principal, "p2")["predictions"]
    assert final == pytest.approx(predict_history(a.served, _frame(applied)), abs=2e-5)
