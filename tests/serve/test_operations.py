"""Running the service: token commands, readiness, the concurrency limit, TLS, and rebuilding every state for a
new model."""

import asyncio
import shutil
import ssl
import subprocess

import httpx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from medstate.cli import app as cli
from medstate.serve.app import Limits, _Guard, create_app
from medstate.serve.patient import predict_history
from medstate.serve.service import open_service
from medstate.serve.store import Principal, open_store

from .conftest import free_port, served_model, start_server


@pytest.fixture(scope="module")
def model_dir(prepared_demo, tmp_path_factory):
    directory = tmp_path_factory.mktemp("served") / "model"
    served_model(prepared_demo, directory, "last", 2)
    return directory


def test_token_commands(tmp_path):
    runner, db = CliRunner(), str(tmp_path / "serve.db")
    made = runner.invoke(cli, ["serve-token", "create", "ward-3", "--scopes", "ingest,read", "--db", db])
    assert made.exit_code == 0, made.output
    token = made.output.strip()
    store = open_store(db)
    assert store.principal(token) == Principal("ward-3", frozenset({"ingest", "read"}))
    assert token not in (tmp_path / "serve.db").read_bytes().decode("latin-1")  # only its digest is stored
    again = runner.invoke(cli, ["serve-token", "create", "ward-3", "--db", db])
    assert again.exit_code == 2 and "exists" in again.output
    wrong = runner.invoke(cli, ["serve-token", "create", "x", "--scopes", "read,write", "--db", db])
    assert wrong.exit_code == 2 and "scopes must be some of ingest, read, admin" in wrong.output
    assert runner.invoke(cli, ["serve-token", "revoke", "ward-3", "--db", db]).exit_code == 0
    assert store.principal(token) is None
    listed = runner.invoke(cli, ["serve-token", "list", "--db", db])
    assert "ward-3" in listed.output and "ingest,read" in listed.output
    assert runner.invoke(cli, ["serve-token", "revoke", "nobody", "--db", db]).exit_code == 2


def test_readiness_says_when_the_database_does_not_answer(model_dir, tmp_path):
    service = open_service(model_dir, tmp_path / "serve.db")
    client = TestClient(create_app(service))
    assert client.get("/health/ready").json() == {"status": "ready", "database": "sqlite"}
    service.store.path = str(tmp_path)  # a folder: SQLite cannot open it
    response = client.get("/health/ready")
    assert response.status_code == 503 and response.json()["status"] == "not ready"
    assert client.get("/health").status_code == 200  # alive, though not ready


def test_requests_over_the_concurrency_limit_get_503():
    release = asyncio.Event()
    statuses = []

    async def slow_app(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    guard = _Guard(slow_app, Limits(max_concurrent=2))

    async def request():
        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await guard({"type": "http", "headers": []}, receive, send)

    async def main():
        first = [asyncio.create_task(request()) for _ in range(2)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(request(), 5)  # a third while two are served: refused at once, not queued
        release.set()
        await asyncio.gather(*first)
        await request()  # and once they are done

    asyncio.run(main())
    assert statuses == [503, 200, 200, 200]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl to make a test certificate")
def test_tls(model_dir, tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-days",
                    "1", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    port = free_port()
    server = start_server(model_dir, tmp_path / "serve.db", port, "--ssl-keyfile", str(key), "--ssl-certfile",
                          str(cert), scheme="https")  # fmt: skip
    try:
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)  # no plain HTTP beside it
    finally:
        server.kill()
        server.wait()


def test_a_new_model_rebuilds_every_state(prepared_demo, demo_events, model_dir, tmp_path):
    import polars as pl

    from medstate.serve.app import MedsEvent

    db = tmp_path / "serve.db"
    old = open_service(model_dir, db)
    who = Principal("loader", frozenset({"ingest"}))
    frames = {}
    for subject in (10004457, 10002930):
        frame = demo_events.filter(pl.col("subject_id") == subject).head(80)
        rows = frame.select("time", "code", "numeric_value", "hadm_id").iter_rows()
        old.ingest(who, str(subject), [MedsEvent(event_id=str(i), time=t, code=c, numeric_value=v, hadm_id=h)
                                       .incoming() for i, (t, c, v, h) in enumerate(rows)])  # fmt: skip
        frames[str(subject)] = frame
    new_dir = tmp_path / "new-model"
    new = served_model(prepared_demo, new_dir, "last", 1)  # other weights, another Mamba version
    result = CliRunner().invoke(cli, ["serve-rebuild", str(new_dir), "--db", str(db)])
    assert result.exit_code == 0, result.output
    service = open_service(new_dir, db)
    assert service.version != old.version
    reader = Principal("reader", frozenset({"read"}))
    for patient, frame in frames.items():
        expected = predict_history(new, frame.select("time", "code", "numeric_value", "hadm_id"))
        assert service.predictions(reader, patient)["predictions"] == pytest.approx(expected, abs=2e-5)
        with service.store.transaction() as cursor:
            record = service.store.read_patient(cursor, patient)
        assert record.model_version == service.version
    # and the rebuilt state goes on exactly
    more = demo_events.filter(pl.col("subject_id") == 10004457).slice(80, 20)
    rows = more.select("time", "code", "numeric_value", "hadm_id").iter_rows()
    after = service.ingest(who, "10004457", [MedsEvent(event_id=f"m{i}", time=t, code=c, numeric_value=v, hadm_id=h)
                                             .incoming() for i, (t, c, v, h) in enumerate(rows)])  # fmt: skip
    whole = pl.concat([frames["10004457"], more]).select("time", "code", "numeric_value", "hadm_id")
    assert after.predictions == pytest.approx(predict_history(new, whole), abs=2e-5)
