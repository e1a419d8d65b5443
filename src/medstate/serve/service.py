"""The service's logic, apart from HTTP: ingest a patient's events (idempotent, one transaction with the state and
the predictions), read current predictions and their history, predict from a whole history without keeping it,
and rebuild every state for a new model. Live streams are cached per patient; a cached stream is used only while
the database's log still has the length it had (another instance may have written since), else the stream is
restored from the saved state (the log tokenized again) or, when the state belongs to another model, re-encoded.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl

from medstate.ehr.prepare import PrepareConfig
from medstate.ehr.sequences import at_end_of_day, visit_key_columns
from medstate.ehr.streaming import StreamEvent
from medstate.errors import MedstateError
from medstate.serve.patient import PatientStream, ServedModel, explain, predict_history
from medstate.serve.store import Principal, Store


def model_version(directory: str | Path) -> str:
    """A digest of the checkpoint's files: states computed by another model are never reused."""
    digest = hashlib.sha256()
    for path in sorted(Path(directory).iterdir()):
        if path.is_file():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class IncomingEvent:
    """One MEDS row as a client sends it, with its idempotency key."""

    key: str
    time: datetime | None
    code: str
    numeric_value: float | None = None
    hadm_id: str | None = None
    encounter_id: str | None = None
    time_precision: str | None = None  # "day": a date without a time (FHIR)


def stream_events(events: list[IncomingEvent], settings: PrepareConfig) -> list[StreamEvent]:
    """MEDS rows → the streaming tokenizer's events, as `prepare` reads them: date-only events at the end of their
    day (`at_end_of_day`), the visit key the first of the setting's key columns that the row has."""
    if not events:
        return []
    frame = at_end_of_day(
        pl.DataFrame(
            {"time": [e.time for e in events], "code": [e.code for e in events],
             "time_precision": [e.time_precision for e in events]},
            schema={"time": pl.Datetime("us"), "code": pl.String, "time_precision": pl.String},
        ),
        settings.date_only_codes,
    )  # fmt: skip
    columns = visit_key_columns(settings.visit)
    out = []
    for event, moment in zip(events, frame["time"].to_list()):
        values = {"hadm_id": event.hadm_id, "encounter_id": event.encounter_id}
        key = next((f"{c}:{values[c]}" for c in columns if values[c] is not None), None)
        out.append(StreamEvent(moment, event.code, event.numeric_value, key))
    return out


def fhir_events(payload: dict, patient_id: str) -> list[IncomingEvent]:
    """A FHIR R4 resource or Bundle → MEDS rows through the data layer's FHIR reader (strict: a resource it cannot
    convert is an error naming it), each keyed by its resource version and its place among that resource's events,
    so that a resent resource is applied once. Every event must belong to Patient/`patient_id`."""
    import json
    import tempfile

    from medstate.data.fhir import FhirReader, stable_subject_id
    from medstate.data.report import ConversionReport

    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "payload.json"
        path.write_text(json.dumps(payload))
        reader = FhirReader(path, ConversionReport(strict=True), resource_keys=True)
        frames = [frame for _, frame in reader.events()]
    if not frames:
        return []
    rows = pl.concat(frames)
    others = rows.filter(pl.col("subject_id") != stable_subject_id(patient_id))
    if others.height:
        raise MedstateError(f"{others.height} event(s) of the payload belong to another patient than {patient_id}")
    rows = rows.with_columns(pl.int_range(pl.len()).over("_resource").alias("_index"))
    return [
        IncomingEvent(f"fhir:{resource}#{index}", time, code, value, None, encounter, precision)
        for time, code, value, encounter, precision, resource, index in rows.select(
            "time", "code", "numeric_value", "encounter_id", "time_precision", "_resource", "_index"
        ).iter_rows()
    ]


def stream_frame(events: list[StreamEvent]) -> pl.DataFrame:
    """Streaming events as the event table `build_sequence` reads (arrival order; keys back in their columns)."""
    keys = [e.visit_key.split(":", 1) if e.visit_key else (None, None) for e in events]
    return pl.DataFrame(
        {"time": [e.time for e in events], "code": [e.code for e in events],
         "numeric_value": [e.numeric_value for e in events],
         "hadm_id": [v if c == "hadm_id" else None for c, v in keys],
         "encounter_id": [v if c == "encounter_id" else None for c, v in keys]},
        schema={"time": pl.Datetime("us"), "code": pl.String, "numeric_value": pl.Float64, "hadm_id": pl.String,
                "encounter_id": pl.String},
    )  # fmt: skip


@dataclass
class IngestResult:
    applied: int
    duplicates: int
    events: int  # the patient's log length after this ingest
    predictions: dict[str, float]
    replayed_tokens: int


def open_service(model_dir: str | Path, db: str | Path, reencode: bool = False) -> PatientService:
    """The service for a finetuned EhrMamba checkpoint over a database (SQLite path or postgresql:// URL)."""
    from medstate.serve.store import open_store

    return PatientService(ServedModel.load(model_dir), open_store(db), model_version(model_dir), reencode=reencode)


class PatientService:
    """`reencode=True` serves the way EHR foundation-model tools do today, as the benchmark's peer: no state is
    kept, and every ingest re-encodes the patient's whole log."""

    def __init__(self, served: ServedModel, store: Store, version: str, cache_size: int = 1024, reencode: bool = False):
        self.served, self.store, self.version, self.reencode = served, store, version, reencode
        self.cache: OrderedDict[str, tuple[int, PatientStream]] = OrderedDict()
        self.cache_size = cache_size
        self._lock = threading.Lock()  # guards the cache; patients are serialized by the database's lock
        # the model runs one request at a time: concurrent requests each running torch's thread pool on the same
        # cores slow every one of them down (taken after a patient's database lock, released before any other)
        self._compute = threading.Lock()

    # ----- writing ----------------------------------------------------------------------------------------------
    def ingest(self, principal: Principal, patient_id: str, events: list[IncomingEvent]) -> IngestResult:
        """Apply the events whose keys the patient does not have yet (the first of equal keys in a request), in
        one transaction with the new state and predictions; a failure leaves nothing applied."""
        with self.store.transaction() as db:
            self.store.lock_patient(db, patient_id)
            count = self.store.event_count(db, patient_id) or 0
            known = self.store.known_keys(db, patient_id, [e.key for e in events])
            fresh, seen = [], set(known)
            for event in events:
                if event.key not in seen:
                    seen.add(event.key)
                    fresh.append(event)
            if self.reencode:
                return self._reencode(db, principal, patient_id, count, fresh, len(events) - len(fresh))
            with self._compute:
                stream = self._stream(db, patient_id, count)
            try:
                before = dict(stream.snapshots)
                replayed = stream.replayed_tokens
                converted = stream_events(fresh, self.served.settings)
                with self._compute:
                    stream.extend(converted)
                    predictions = stream.predictions()
                if fresh:
                    self.store.append_events(db, patient_id, count + 1, list(zip([e.key for e in fresh], converted)))
                    changed = {p: s.to_bytes() for p, s in stream.snapshots.items() if before.get(p) is not s}
                    removed = set(before) - set(stream.snapshots)
                    self.store.save_patient(db, patient_id, self.version, count + len(fresh), stream.state_bytes(),
                                            changed, removed)  # fmt: skip
                    last_time = max((e.time for e in fresh if e.time is not None), default=None)
                    self.store.save_predictions(db, patient_id, count + len(fresh), last_time, predictions)
                self.store.audit(db, principal.name, "ingest", patient_id)
            except BaseException:
                self._forget(patient_id)  # the stream may be ahead of the database
                raise
        self._keep(patient_id, count + len(fresh), stream)
        return IngestResult(len(fresh), len(events) - len(fresh), count + len(fresh), predictions,
                            stream.replayed_tokens - replayed)  # fmt: skip

    def _reencode(self, db, principal, patient_id, count, fresh, duplicates) -> IngestResult:
        record = self.store.read_patient(db, patient_id)
        converted = stream_events(fresh, self.served.settings)
        history = (record.events if record else []) + converted
        with self._compute:
            predictions = predict_history(self.served, stream_frame(history))
        if fresh:
            self.store.append_events(db, patient_id, count + 1, list(zip([e.key for e in fresh], converted)))
            self.store.save_patient(db, patient_id, self.version, count + len(fresh), None, {}, set())
            last_time = max((e.time for e in fresh if e.time is not None), default=None)
            self.store.save_predictions(db, patient_id, count + len(fresh), last_time, predictions)
        self.store.audit(db, principal.name, "ingest", patient_id)
        return IngestResult(len(fresh), duplicates, count + len(fresh), predictions, 0)

    def rebuild(self, progress: Callable[[int, int], None] | None = None) -> int:
        """Every patient's state re-encoded from the event log with this model (after a model change)."""
        with self.store.transaction() as db:
            patients = self.store.patient_ids(db)
        for done, patient_id in enumerate(patients, 1):
            with self.store.transaction() as db:
                self.store.lock_patient(db, patient_id)
                record = self.store.read_patient(db, patient_id)
                stream = PatientStream(self.served, record.events)
                self.store.save_patient(db, patient_id, self.version, len(record.events), stream.state_bytes(),
                                        stream.snapshot_bytes(), set(record.snapshots))  # fmt: skip
                self.store.save_predictions(db, patient_id, len(record.events),
                                            max((e.time for e in record.events if e.time), default=None),
                                            stream.predictions())  # fmt: skip
            self._forget(patient_id)
            if progress:
                progress(done, len(patients))
        return len(patients)

    # ----- reading ------------------------------------------------------------------------------------------------
    def predictions(self, principal: Principal, patient_id: str) -> dict:
        return {"patient_id": patient_id, "model_version": self.version,
                **self._history(principal, patient_id, "read")[-1]}  # fmt: skip

    def history(self, principal: Principal, patient_id: str) -> list[dict]:
        return self._history(principal, patient_id, "read history")

    def _history(self, principal: Principal, patient_id: str, action: str) -> list[dict]:
        """The predictions after each ingest, tasks in the model's order."""
        with self.store.transaction() as db:
            history = self.store.prediction_history(db, patient_id)
            self.store.audit(db, principal.name, action, patient_id)
        if not history:
            raise KeyError(patient_id)
        order = [t.name for t in self.served.tasks]
        for entry in history:
            entry["predictions"] = {t: entry["predictions"][t] for t in order if t in entry["predictions"]}
        return history

    def explain(self, principal: Principal, patient_id: str, task_name: str, top: int = 10) -> dict:
        """The events that move a task's current probability most (integrated gradients)."""
        task = next((t for t in self.served.tasks if t.name == task_name), None)
        if task is None:
            names = ", ".join(t.name for t in self.served.tasks)
            raise MedstateError(f"unknown task {task_name!r}; this model predicts {names}")
        with self.store.transaction() as db:
            record = self.store.read_patient(db, patient_id)
            self.store.audit(db, principal.name, f"explain {task_name}", patient_id)
        if record is None or not record.events:
            raise KeyError(patient_id)
        with self._compute:
            found, probability = explain(self.served, record.events, task, top)
        events = [{"code": code, "time": None if moment is None else moment.isoformat(), "attribution": score}
                  for code, moment, score in found]  # fmt: skip
        return {"patient_id": patient_id, "task": task_name, "probability": probability, "events": events}

    def predict(self, principal: Principal, events: list[IncomingEvent]) -> dict[str, float]:
        """A whole history's predictions by re-encoding it; nothing is kept."""
        with self.store.transaction() as db:
            self.store.audit(db, principal.name, "predict (not kept)", None)
        with self._compute:
            return predict_history(self.served, stream_frame(stream_events(events, self.served.settings)))

    # ----- the stream cache -------------------------------------------------------------------------------------------
    def _stream(self, db, patient_id: str, count: int) -> PatientStream:
        with self._lock:
            cached = self.cache.get(patient_id)
        if cached is not None and cached[0] == count:
            return cached[1]
        record = self.store.read_patient(db, patient_id)
        if record is None or not record.events:
            return PatientStream(self.served)
        if record.state is not None and record.model_version == self.version:
            try:
                return PatientStream.restore(self.served, record.events, record.state, record.snapshots)
            except MedstateError:
                pass  # a state that does not fit: encode the log again
        return PatientStream(self.served, record.events)

    def _keep(self, patient_id: str, count: int, stream: PatientStream) -> None:
        with self._lock:
            self.cache[patient_id] = (count, stream)
            self.cache.move_to_end(patient_id)
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)

    def _forget(self, patient_id: str) -> None:
        with self._lock:
            self.cache.pop(patient_id, None)
