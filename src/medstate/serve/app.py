"""The HTTP API (FastAPI): `create_app(service)`; `medstate serve MODEL_DIR --db …` runs it with uvicorn.

    GET  /health                                   liveness: the process answers (no token)
    GET  /health/ready                             readiness: the database answers (503 if not; no token)
    POST /v1/patients/{patient_id}/events          MEDS rows, each with an event_id (idempotency key)   [ingest]
    POST /v1/patients/{patient_id}/fhir            a FHIR R4 resource or Bundle (keys: resource versions) [ingest]
    GET  /v1/patients/{patient_id}/predictions     every task's current probability                     [read]
    GET  /v1/patients/{patient_id}/history         the probabilities after each ingest                  [read]
    GET  /v1/patients/{patient_id}/explain?task=T  the events that move task T most (attributions)     [read]
    POST /v1/predict                               a whole history's predictions, nothing kept          [read]
    GET  /view/{patient_id}                        a read-only page: risk per task over time, the events
                                                   that moved it (the page holds no data: it asks the API
                                                   with the token given as /view/ID#token=…)
    GET  /metrics                                  Prometheus metrics                                   [admin]
    GET  /docs, /openapi.json                      the API's documentation (no patient data, no token)

Every endpoint but health, the page's shell and the documentation needs `Authorization: Bearer <token>`
(`medstate serve-token create`): no or an unknown or revoked token is 401, a token without the endpoint's scope
403. A malformed body is a 422 naming the field, a body over the size limit 413, more concurrent requests than
allowed 503; a request that fails is applied not at all. Logs at INFO name the route, never a patient or a value.
"""

import asyncio
import logging
import math
import time
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated

import uvicorn
from fastapi import Body, Depends, FastAPI, Header, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from medstate.errors import MedstateError
from medstate.serve.service import IncomingEvent, PatientService, fhir_events, open_service
from medstate.serve.store import Principal

log = logging.getLogger("medstate.serve")
_PAGE = resources.files("medstate.serve").joinpath("resources/patient.html").read_text()
PatientId = Annotated[str, Path(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$")]


class MedsEvent(BaseModel):
    """One MEDS row. `time` without a zone is read as given (MEDS times are local to the source); with a zone it is
    converted to UTC. No time: a static fact. `hadm_id` / `encounter_id`: the visit it belongs to, if any."""

    model_config = ConfigDict(extra="forbid")
    event_id: str = Field(min_length=1, max_length=256, description="idempotency key: a retried event is applied once")
    time: datetime | None = None
    code: str = Field(min_length=1, max_length=512)
    numeric_value: float | None = None
    hadm_id: str | int | None = None
    encounter_id: str | None = Field(default=None, max_length=256)

    @field_validator("numeric_value")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("numeric_value must be a finite number")
        return value

    @field_validator("time")
    @classmethod
    def _naive(cls, value: datetime | None) -> datetime | None:
        return value.astimezone(UTC).replace(tzinfo=None) if value is not None and value.tzinfo else value

    def incoming(self) -> IncomingEvent:
        hadm = None if self.hadm_id is None else str(self.hadm_id)
        return IncomingEvent(self.event_id, self.time, self.code, self.numeric_value, hadm, self.encounter_id)


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    events: list[MedsEvent] = Field(min_length=1, max_length=10_000)


class IngestResponse(BaseModel):
    applied: int
    duplicates: int
    events: int
    predictions: dict[str, float]


class Limits(BaseModel):
    max_body_bytes: int = 4 * 1024 * 1024
    max_concurrent: int = 32


class _Guard:
    """ASGI middleware: the request body size limit (413) and the concurrent request limit (503)."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits
        self.active = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limits.max_body_bytes):
            return await _plain(send, 413, "request body too large")
        if self.active >= self.limits.max_concurrent:
            return await _plain(send, 503, "too many concurrent requests", [(b"retry-after", b"1")])
        self.active += 1
        received, too_large = 0, False

        async def bounded():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limits.max_body_bytes:
                too_large = True
                raise _TooLarge
            return message

        async def guarded(message):
            if not too_large:  # once the body is too large, whatever the app answers is replaced by a 413
                await send(message)

        try:
            await self.app(scope, bounded, guarded)
        except _TooLarge:
            pass
        finally:
            self.active -= 1
        if too_large:
            await _plain(send, 413, "request body too large")


class _TooLarge(Exception):
    pass


async def _plain(send, status: int, detail: str, headers=()) -> None:
    body = ('{"detail": "' + detail + '"}').encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), *headers]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


def create_app(service: PatientService, limits: Limits | None = None) -> FastAPI:
    from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

    limits = limits or Limits()
    app = FastAPI(title="medstate", summary="Per-patient streaming risk from an EhrMamba model", version="1")
    registry = CollectorRegistry()
    requests = Counter("medstate_requests", "HTTP requests", ["route", "status"], registry=registry)
    latency = Histogram("medstate_request_seconds", "request latency", ["route"], registry=registry)
    applied = Counter("medstate_events_applied", "events applied to patient states", registry=registry)
    duplicates = Counter("medstate_events_duplicate", "retried events not applied again", registry=registry)
    replayed = Counter("medstate_tokens_replayed", "tokens fed again after a late event", registry=registry)

    def principal(scope: str):
        def check(authorization: Annotated[str | None, Header()] = None) -> Principal:
            if not authorization or not authorization.startswith("Bearer "):
                raise HTTPException(401, "a bearer token is required", headers={"WWW-Authenticate": "Bearer"})
            found = service.store.principal(authorization.removeprefix("Bearer ").strip())
            if found is None:
                raise HTTPException(401, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"})
            if scope not in found.scopes:
                raise HTTPException(403, f"this token lacks the {scope!r} scope")
            return found

        return check

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")
        requests.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - started)
        log.info("%s %s %d %.1f ms", request.method, route, response.status_code, 1e3 * (time.perf_counter() - started))
        return response

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, err: RequestValidationError):
        # where and why, without echoing the input (it may be a patient's value, or not JSON: NaN)
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "invalid")} for e in err.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(MedstateError)
    async def bad_input(request: Request, err: MedstateError):
        return JSONResponse({"detail": str(err)}, status_code=400)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_version": service.version, "tasks": [t.name for t in service.served.tasks]}

    @app.get("/health/ready")
    def ready() -> JSONResponse:
        try:
            service.store.ping()
        except Exception as err:  # whatever the driver raises: not ready, and why (no patient data here)
            return JSONResponse({"status": "not ready", "reason": type(err).__name__}, status_code=503)
        return JSONResponse({"status": "ready", "database": service.store.kind})

    @app.post("/v1/patients/{patient_id}/events", response_model=IngestResponse)
    async def ingest(patient_id: PatientId, batch: EventBatch, who: Annotated[Principal, Depends(principal("ingest"))]):
        events = [e.incoming() for e in batch.events]
        result = await asyncio.to_thread(service.ingest, who, patient_id, events)
        applied.inc(result.applied)
        duplicates.inc(result.duplicates)
        replayed.inc(result.replayed_tokens)
        return IngestResponse(applied=result.applied, duplicates=result.duplicates, events=result.events,
                              predictions=result.predictions)  # fmt: skip

    @app.post("/v1/patients/{patient_id}/fhir", response_model=IngestResponse)
    async def ingest_fhir(
        patient_id: PatientId,
        payload: Annotated[dict, Body(description="a FHIR R4 resource, or a Bundle of them, of this patient")],
        who: Annotated[Principal, Depends(principal("ingest"))],
    ):
        if not isinstance(payload.get("resourceType"), str):
            raise HTTPException(422, "not a FHIR resource (no resourceType)")
        events = await asyncio.to_thread(fhir_events, payload, patient_id)
        if not events:
            raise HTTPException(422, "the payload holds no event the FHIR reader converts")
        result = await asyncio.to_thread(service.ingest, who, patient_id, events)
        applied.inc(result.applied)
        duplicates.inc(result.duplicates)
        return IngestResponse(applied=result.applied, duplicates=result.duplicates, events=result.events,
                              predictions=result.predictions)  # fmt: skip

    @app.get("/v1/patients/{patient_id}/predictions")
    async def current(patient_id: PatientId, who: Annotated[Principal, Depends(principal("read"))]) -> dict:
        try:
            return await asyncio.to_thread(service.predictions, who, patient_id)
        except KeyError:
            raise HTTPException(404, "no events for this patient") from None

    @app.get("/v1/patients/{patient_id}/history")
    async def history(patient_id: PatientId, who: Annotated[Principal, Depends(principal("read"))]) -> list[dict]:
        try:
            return await asyncio.to_thread(service.history, who, patient_id)
        except KeyError:
            raise HTTPException(404, "no events for this patient") from None

    @app.get("/v1/patients/{patient_id}/explain")
    async def explain(
        patient_id: PatientId,
        who: Annotated[Principal, Depends(principal("read"))],
        task: Annotated[str, Query(min_length=1, max_length=128)],
        top: Annotated[int, Query(ge=1, le=100)] = 10,
    ) -> dict:
        try:
            return await asyncio.to_thread(service.explain, who, patient_id, task, top)
        except KeyError:
            raise HTTPException(404, "no events for this patient") from None

    @app.get("/view/{patient_id}", response_class=HTMLResponse)
    def view(patient_id: PatientId) -> str:
        return _PAGE

    @app.post("/v1/predict")
    async def predict(batch: EventBatch, who: Annotated[Principal, Depends(principal("read"))]) -> dict:
        events = [e.incoming() for e in batch.events]
        return {"predictions": await asyncio.to_thread(service.predict, who, events), "kept": False}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics(who: Annotated[Principal, Depends(principal("admin"))]) -> str:
        return generate_latest(registry).decode()

    app.add_middleware(_Guard, limits=limits)  # outermost: size and concurrency are checked first
    return app


def run_server(
    model_dir: str,
    db: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    limits: Limits | None = None,
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
    reencode: bool = False,
) -> None:
    """Serve the model's predictions from the database `db` (`open_service`) over HTTP (HTTPS with a key and
    certificate pair) until stopped, logging at INFO level (never patient data: see `create_app`)."""
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise MedstateError("TLS needs both --ssl-keyfile and --ssl-certfile")
    service = open_service(model_dir, db, reencode=reencode)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    uvicorn.run(create_app(service, limits), host=host, port=port, access_log=False, log_level="info",
                ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)  # fmt: skip
