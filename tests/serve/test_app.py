"""The HTTP API on SQLite: the auth matrix, malformed bodies (4xx, nothing applied), idempotent retries,
predictions equal to re-encoding through the API and after a restart, the audit log, and no patient data in the
INFO logs."""

import json
import logging

import polars as pl
import pytest
from fastapi.testclient import TestClient

from medstate.serve.app import Limits, create_app
from medstate.serve.patient import predict_history
from medstate.serve.service import open_service
from medstate.serve.store import open_store

from .conftest import free_port, served_model, start_server

PATIENT = "10004457"


@pytest.fixture(scope="module")
def model_dir(prepared_demo, tmp_path_factory):
    directory = tmp_path_factory.mktemp("served") / "model"
    served_model(prepared_demo, directory, "last", 2)
    return directory


@pytest.fixture
def server(model_dir, tmp_path):
    db = tmp_path / "serve.db"
    store = open_store(db)
    tokens = {scope: store.create_token(f"{scope}-client", [scope]) for scope in ("ingest", "read", "admin")}
    tokens["revoked"] = store.create_token("gone", ["ingest", "read", "admin"])
    store.revoke_token("gone")
    client = TestClient(create_app(open_service(model_dir, db), Limits(max_body_bytes=1_500_000)))
    return client, tokens, db, model_dir


def _rows(demo_events, n, start=0):
    frame = demo_events.filter(pl.col("subject_id") == int(PATIENT)).slice(start, n)
    return [
        {"event_id": f"e{start + i}", "time": None if t is None else t.isoformat(), "code": c,
         "numeric_value": None if v is None else float(v), "hadm_id": h}
        for i, (t, c, v, h) in enumerate(frame.select("time", "code", "numeric_value", "hadm_id").iter_rows())
    ]  # fmt: skip


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_auth_matrix(server, demo_events):
    client, tokens = server[:2]
    body = {"events": _rows(demo_events, 3)}
    endpoints = {
        "ingest": ("post", f"/v1/patients/{PATIENT}/events", body),
        "read": ("get", f"/v1/patients/{PATIENT}/predictions", None),
        "history": ("get", f"/v1/patients/{PATIENT}/history", None),
        "predict": ("post", "/v1/predict", body),
        "admin": ("get", "/metrics", None),
    }
    needs = {"ingest": "ingest", "read": "read", "history": "read", "predict": "read", "admin": "admin"}
    for name, (method, url, payload) in endpoints.items():
        assert client.request(method, url, json=payload).status_code == 401, name  # no token
        bad = client.request(method, url, json=payload, headers=_auth("mst_not-a-token"))
        assert bad.status_code == 401, name
        revoked = client.request(method, url, json=payload, headers=_auth(tokens["revoked"]))
        assert revoked.status_code == 401 and "revoked" in revoked.json()["detail"], name
        for scope in ("ingest", "read", "admin"):
            status = client.request(method, url, json=payload, headers=_auth(tokens[scope])).status_code
            assert (status < 400) == (scope == needs[name]) and (status in (200, 403)), (name, scope, status)
    assert client.get("/health").status_code == 200  # the one endpoint without a token
    assert client.get("/openapi.json").status_code == 200


def test_malformed_bodies_are_4xx_and_apply_nothing(server, demo_events):
    client, tokens, db = server[:3]
    url, headers = f"/v1/patients/{PATIENT}/events", _auth(tokens["ingest"])
    good = _rows(demo_events, 4)
    assert client.post(url, json={"events": good}, headers=headers).json()["events"] == 4
    cases = {
        "no code": [*_rows(demo_events, 2, 4), {"event_id": "x1", "time": "2130-01-01T00:00:00"}],
        "bad time": [*_rows(demo_events, 2, 4), {"event_id": "x2", "time": "yesterday", "code": "A"}],
        "unknown field": [*_rows(demo_events, 2, 4), {"event_id": "x3", "code": "A", "value": 1}],
        "no event id": [*_rows(demo_events, 2, 4), {"code": "A"}],
        "empty": [],
    }
    for name, events in cases.items():
        response = client.post(url, json={"events": events}, headers=headers)
        assert response.status_code == 422, name
        assert response.json()["detail"], name  # says why
    not_finite = '{"events": [{"event_id": "n", "code": "LAB", "numeric_value": NaN}]}'
    response = client.post(url, content=not_finite, headers={**headers, "content-type": "application/json"})
    assert response.status_code == 422
    assert (
        client.post(url, content=b"{not json", headers={**headers, "content-type": "application/json"}).status_code
        == 422
    )
    big = {"events": [{"event_id": f"b{i}", "code": "X" * 500} for i in range(4000)]}
    assert client.post(url, json=big, headers=headers).status_code == 413
    chunks = (json.dumps(big).encode()[i : i + 65536] for i in range(0, len(json.dumps(big)), 65536))
    streamed = client.post(url, content=chunks, headers={**headers, "content-type": "application/json"})
    assert streamed.status_code == 413  # no content-length: counted as it arrives
    assert client.post("/v1/patients/bad%20id!/events", json={"events": good}, headers=headers).status_code == 422
    store = open_store(db)
    with store.transaction() as cursor:
        assert store.event_count(cursor, PATIENT) == 4  # nothing of the failed requests was applied


def test_retries_apply_once_and_predictions_equal_reencoding(server, model_dir, demo_events):
    client, tokens, db = server[:3]
    url, headers = f"/v1/patients/{PATIENT}/events", _auth(tokens["ingest"])
    rows = _rows(demo_events, 120)
    first = client.post(url, json={"events": rows[:80]}, headers=headers).json()
    assert (first["applied"], first["duplicates"], first["events"]) == (80, 0, 80)
    retry = client.post(url, json={"events": rows[60:120] + rows[100:101]}, headers=headers).json()
    assert (retry["applied"], retry["duplicates"], retry["events"]) == (40, 21, 120)
    served = open_service(model_dir, db).served
    frame = _frame(rows)
    expected = predict_history(served, frame)
    assert retry["predictions"] == pytest.approx(expected, abs=2e-5)
    read = client.get(f"/v1/patients/{PATIENT}/predictions", headers=_auth(tokens["read"])).json()
    assert read["events"] == 120 and read["predictions"] == pytest.approx(expected, abs=2e-5)
    history = client.get(f"/v1/patients/{PATIENT}/history", headers=_auth(tokens["read"])).json()
    assert [h["events"] for h in history] == [80, 120]
    stateless = client.post("/v1/predict", json={"events": rows}, headers=_auth(tokens["read"])).json()
    assert stateless["predictions"] == pytest.approx(expected, abs=1e-6) and stateless["kept"] is False

    # a restart: a new process (no cache) continues from the database's state
    restarted = TestClient(create_app(open_service(model_dir, db)))
    more = _rows(demo_events, 40, 120)
    after = restarted.post(url, json={"events": more}, headers=headers).json()
    whole = predict_history(served, _frame(rows + more))
    assert after["events"] == 160 and after["predictions"] == pytest.approx(whole, abs=2e-5)
    audit = open_store(db).audit_log(PATIENT)
    assert [(a["actor"], a["action"]) for a in audit] == [("ingest-client", "ingest")] * 2 + [
        ("read-client", "read"), ("read-client", "read history"), ("ingest-client", "ingest")]  # fmt: skip


def _frame(rows):
    """The rows sent, as the MEDS table `build_sequence` reads (written here, not by the service's code)."""
    from datetime import datetime

    return pl.DataFrame(
        {"time": [None if r["time"] is None else datetime.fromisoformat(r["time"]) for r in rows],
         "code": [r["code"] for r in rows], "numeric_value": [r["numeric_value"] for r in rows],
         "hadm_id": [r["hadm_id"] for r in rows]},
        schema={"time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64, "hadm_id": pl.Int64},
    )  # fmt: skip


def test_info_logs_hold_no_patient_data(server, demo_events, caplog):
    client, tokens = server[:2]
    rows = _rows(demo_events, 30)
    with caplog.at_level(logging.INFO):
        client.post(f"/v1/patients/{PATIENT}/events", json={"events": rows}, headers=_auth(tokens["ingest"]))
        client.get(f"/v1/patients/{PATIENT}/predictions", headers=_auth(tokens["read"]))
    server_side = [r for r in caplog.records if r.name.startswith(("medstate", "uvicorn", "fastapi", "starlette"))]
    text = "\n".join(r.getMessage() for r in server_side)  # (the test client logs its own requests)
    assert "/v1/patients/{patient_id}/events" in text  # the route is logged
    assert PATIENT not in text and not any(r["code"] in text for r in rows)
    assert json.dumps(rows[0]["time"]).strip('"')[:10] not in text


def test_sigkill_mid_stream_loses_no_acknowledged_event_and_applies_none_twice(model_dir, tmp_path, demo_events):
    """A real server process, killed with SIGKILL while a client streams ingests; after a restart the client
    sends everything again (it cannot know what the last request did): each event is in the log exactly once,
    every acknowledged one among them, and the predictions are re-encoding's."""
    import os
    import signal
    import threading

    import httpx

    db = tmp_path / "serve.db"
    token = open_store(db).create_token("feed", ["ingest", "read"])
    rows = _rows(demo_events, 150)
    port = free_port()
    server = start_server(model_dir, db, port)
    acknowledged: list[str] = []
    killed = threading.Event()

    def feed():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=_auth(token), timeout=30) as client:
            for start in range(0, len(rows), 3):
                try:
                    response = client.post(f"/v1/patients/{PATIENT}/events", json={"events": rows[start : start + 3]})
                except httpx.HTTPError:
                    return  # the server is gone
                assert response.status_code == 200
                acknowledged.extend(r["event_id"] for r in rows[start : start + 3])
                if len(acknowledged) >= 60 and not killed.is_set():
                    killed.set()

    thread = threading.Thread(target=feed)
    thread.start()
    assert killed.wait(120)
    os.kill(server.pid, signal.SIGKILL)
    server.wait()
    thread.join(60)
    assert 60 <= len(acknowledged) < len(rows)
    store = open_store(db)
    with store.transaction() as cursor:
        kept = store.known_keys(cursor, PATIENT, [r["event_id"] for r in rows])
    assert set(acknowledged) <= kept  # nothing acknowledged was lost

    server = start_server(model_dir, db, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=_auth(token), timeout=60) as client:
            for start in range(0, len(rows), 25):  # everything again
                assert client.post(
                    f"/v1/patients/{PATIENT}/events", json={"events": rows[start : start + 25]}
                ).is_success
            final = client.get(f"/v1/patients/{PATIENT}/predictions").json()
    finally:
        server.kill()
        server.wait()
    with store.transaction() as cursor:
        logged = cursor.execute("SELECT seq, event_key FROM events WHERE patient_id = ? ORDER BY seq", (PATIENT,))
        logged = logged.fetchall()
    assert [seq for seq, _ in logged] == list(range(1, len(rows) + 1))
    assert [key for _, key in logged] == [r["event_id"] for r in rows]  # each once, in the order sent
    expected = predict_history(open_service(model_dir, db).served, _frame(rows))
    assert final["events"] == len(rows) and final["predictions"] == pytest.approx(expected, abs=2e-5)


def test_the_reencoding_peer_answers_the_same(model_dir, tmp_path, demo_events):
    from medstate.serve.store import Principal

    who = Principal("bench", frozenset({"ingest"}))
    rows = _rows(demo_events, 60)
    streaming, peer = open_service(model_dir, tmp_path / "a.db"), open_service(model_dir, tmp_path / "b.db", True)
    from medstate.serve.app import MedsEvent

    events = [MedsEvent(**r).incoming() for r in rows]
    for start in (0, 25):
        ours = streaming.ingest(who, PATIENT, events[start : start + 35])
        theirs = peer.ingest(who, PATIENT, events[start : start + 35])
        assert (theirs.applied, theirs.duplicates, theirs.events) == (ours.applied, ours.duplicates, ours.events)
        assert theirs.predictions == pytest.approx(ours.predictions, abs=2e-5)
    assert theirs.predictions == pytest.approx(predict_history(streaming.served, _frame(rows)), abs=1e-6)


def test_fhir_bundles_are_ingested_once_through_the_data_layer(server, tmp_path):
    """A Synthea patient's Bundle posted twice: its events once (keys are resource versions), and the predictions
    those of the MEDS dataset the data layer's converter writes from the same Bundle."""
    import gzip

    from medstate.data.convert import convert
    from medstate.data.fhir import stable_subject_id
    from medstate.data.meds import scan_meds

    client, tokens = server[:2]
    headers = _auth(tokens["ingest"])
    source = "data/demo/synthea-fhir/011b4f39-35eb-4b34-8945-1473cce57ad1.json.gz"
    with gzip.open(source) as handle:
        bundle = json.loads(handle.read())
    patient = next(e["resource"]["id"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    first = client.post(f"/v1/patients/{patient}/fhir", json=bundle, headers=headers)
    assert first.status_code == 200, first.text
    again = client.post(f"/v1/patients/{patient}/fhir", json=bundle, headers=headers).json()
    assert first.json()["applied"] > 150 and (again["applied"], again["duplicates"]) == (0, first.json()["applied"])

    (tmp_path / "bundle").mkdir()
    (tmp_path / "bundle" / "patient.json").write_text(json.dumps(bundle))
    convert(tmp_path / "bundle", tmp_path / "meds", "fhir")
    meds = scan_meds(tmp_path / "meds").collect().filter(pl.col("subject_id") == stable_subject_id(patient))
    assert meds.height == first.json()["applied"]
    served = open_service(*_service_paths(server)).served
    expected = predict_history(served, meds)
    assert first.json()["predictions"] == pytest.approx(expected, abs=2e-5)

    elsewhere = client.post("/v1/patients/someone-else/fhir", json=bundle, headers=headers)
    assert elsewhere.status_code == 400 and "another patient" in elsewhere.json()["detail"]
    broken = {"resourceType": "Observation", "id": "x1", "status": "final",
              "subject": {"reference": f"Patient/{patient}"},
              "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
              "effectiveDateTime": "2020-01-01T10:00:00Z",
              "valueQuantity": {"value": "high", "unit": "g/dL"}}  # fmt: skip
    response = client.post(f"/v1/patients/{patient}/fhir", json=broken, headers=headers)
    assert response.status_code == 400 and "x1" in response.json()["detail"]
    assert client.get(f"/v1/patients/{patient}/predictions", headers=_auth(tokens["read"])).json()["events"] == (
        first.json()["applied"])  # fmt: skip
    assert client.post(f"/v1/patients/{patient}/fhir", json={"no": "type"}, headers=headers).status_code == 422


def _service_paths(server):
    return server[3], server[2]
