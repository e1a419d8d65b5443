"""Where the service keeps patients: SQLite (WAL) by default, PostgreSQL for several instances sharing patients.

Tables: `events` (each patient's log in arrival order, with its idempotency key: an event whose key the patient
already has is not applied again), `patients` (the recurrent state after the log, the model version it belongs to
and the log's length), `snapshots` (states at visit starts), `predictions` (every task's probability after each
ingest: the history over time), `tokens` (API tokens, stored as SHA-256 digests, with scopes), `audit` (who read
or wrote which patient). An ingest is one transaction: the new events, the state and the predictions are written
together or not at all, under a lock on the patient (SQLite: the database's write lock; PostgreSQL: the patient's
row).
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from medstate.ehr.streaming import StreamEvent
from medstate.errors import MedstateError

SCOPES = ("ingest", "read", "admin")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS patients (
    patient_id TEXT PRIMARY KEY, model_version TEXT NOT NULL, events INTEGER NOT NULL, state {blob},
    updated_at TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    patient_id TEXT NOT NULL, seq INTEGER NOT NULL, event_key TEXT NOT NULL, time TEXT, code TEXT NOT NULL,
    numeric_value DOUBLE PRECISION, visit_key TEXT, received_at TEXT NOT NULL,
    PRIMARY KEY (patient_id, seq), UNIQUE (patient_id, event_key));
CREATE TABLE IF NOT EXISTS snapshots (
    patient_id TEXT NOT NULL, position INTEGER NOT NULL, state {blob} NOT NULL, PRIMARY KEY (patient_id, position));
CREATE TABLE IF NOT EXISTS predictions (
    patient_id TEXT NOT NULL, seq INTEGER NOT NULL, task TEXT NOT NULL, probability DOUBLE PRECISION NOT NULL,
    event_time TEXT, recorded_at TEXT NOT NULL, PRIMARY KEY (patient_id, seq, task));
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL, created_at TEXT NOT NULL,
    revoked_at TEXT);
CREATE TABLE IF NOT EXISTS audit (
    id {serial} PRIMARY KEY, at TEXT NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL, patient_id TEXT);
"""


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _time_text(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="microseconds")


def _digest(token: str) -> str:
    # API tokens are 256 random bits: a plain hash cannot be reversed or guessed (no salt or slow hash needed)
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


@dataclass
class PatientRecord:
    events: list[StreamEvent]  # arrival order
    keys: list[str]
    state: bytes | None
    snapshots: dict[int, bytes]
    model_version: str | None


class Store:
    """The database behind the service; `open_store(url)` picks SQLite or PostgreSQL."""

    kind = ""
    placeholder = "?"
    blob, serial = "BLOB", "INTEGER"

    def __init__(self, url: str):
        self.url = url
        with self.transaction() as db:
            for statement in _SCHEMA.format(blob=self.blob, serial=self.serial).split(";"):
                if statement.strip():
                    db.execute(statement)

    # the dialects differ in connecting, locking and parameter style only
    def connect(self):
        raise NotImplementedError

    def lock_patient(self, db, patient_id: str) -> None:
        raise NotImplementedError

    def _sql(self, statement: str) -> str:
        return statement.replace("?", self.placeholder)

    @contextlib.contextmanager
    def transaction(self, write: bool = True) -> Iterator[_Cursor]:
        """One transaction, committed at the end or rolled back on any error. `write=False`: it only reads."""
        with self.writing() if write else contextlib.nullcontext():
            connection = self.connect()
            try:
                cursor = _Cursor(connection.cursor(), self._sql)
                self.begin(cursor, write)
                yield cursor
                connection.commit()
            except BaseException:
                connection.rollback()
                raise
            finally:
                connection.close()

    def writing(self):
        return contextlib.nullcontext()

    def begin(self, db, write: bool) -> None:
        pass

    def ping(self) -> None:
        """Raises if the database does not answer."""
        with self.transaction(write=False) as db:
            db.execute("SELECT 1").fetchone()

    # ----- patients ---------------------------------------------------------------------------------------------
    def read_patient(self, db, patient_id: str) -> PatientRecord | None:
        row = db.execute("SELECT model_version, state FROM patients WHERE patient_id = ?", (patient_id,)).fetchone()
        if row is None:
            return None
        rows = db.execute(
            "SELECT event_key, time, code, numeric_value, visit_key FROM events WHERE patient_id = ? ORDER BY seq",
            (patient_id,),
        ).fetchall()
        events = [StreamEvent(None if t is None else datetime.fromisoformat(t), c, v, k) for _, t, c, v, k in rows]
        snapshots = db.execute("SELECT position, state FROM snapshots WHERE patient_id = ?", (patient_id,)).fetchall()
        return PatientRecord(events, [r[0] for r in rows], None if row[1] is None else bytes(row[1]),
                             {int(p): bytes(s) for p, s in snapshots}, row[0])  # fmt: skip

    def event_count(self, db, patient_id: str) -> int | None:
        row = db.execute("SELECT events FROM patients WHERE patient_id = ?", (patient_id,)).fetchone()
        return None if row is None else int(row[0])

    def known_keys(self, db, patient_id: str, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            marks = ", ".join("?" * len(part))
            query = f"SELECT event_key FROM events WHERE patient_id = ? AND event_key IN ({marks})"
            found.update(r[0] for r in db.execute(query, (patient_id, *part)).fetchall())
        return found

    def append_events(self, db, patient_id: str, first_seq: int, events: list[tuple[str, StreamEvent]]) -> None:
        received = now()
        db.executemany(
            "INSERT INTO events (patient_id, seq, event_key, time, code, numeric_value, visit_key, received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (patient_id, first_seq + i, key, _time_text(e.time), e.code, e.numeric_value, e.visit_key, received)
                for i, (key, e) in enumerate(events)
            ],
        )

    def save_patient(
        self, db, patient_id: str, version: str, events: int, state: bytes, snapshots: dict[int, bytes], removed: set
    ) -> None:
        # an upsert, never delete + insert: PostgreSQL's row lock (lock_patient) must stay on the same row
        db.execute(
            "INSERT INTO patients (patient_id, model_version, events, state, updated_at) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (patient_id) DO UPDATE SET model_version = excluded.model_version, events = excluded.events, "
            "state = excluded.state, updated_at = excluded.updated_at",
            (patient_id, version, events, state, now()),
        )
        for position in removed | set(snapshots):
            db.execute("DELETE FROM snapshots WHERE patient_id = ? AND position = ?", (patient_id, position))
        db.executemany(
            "INSERT INTO snapshots (patient_id, position, state) VALUES (?, ?, ?)",
            [(patient_id, p, s) for p, s in snapshots.items()],
        )

    def save_predictions(self, db, patient_id: str, seq: int, event_time, predictions: dict[str, float]) -> None:
        db.execute("DELETE FROM predictions WHERE patient_id = ? AND seq = ?", (patient_id, seq))
        recorded = now()
        db.executemany(
            "INSERT INTO predictions (patient_id, seq, task, probability, event_time, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [(patient_id, seq, t, p, _time_text(event_time), recorded) for t, p in predictions.items()],
        )

    def prediction_history(self, db, patient_id: str) -> list[dict]:
        rows = db.execute(
            "SELECT seq, task, probability, event_time FROM predictions WHERE patient_id = ? ORDER BY seq, task",
            (patient_id,),
        ).fetchall()
        by_seq: dict[int, dict] = {}
        for seq, task, probability, event_time in rows:
            entry = by_seq.setdefault(seq, {"events": seq, "event_time": event_time, "predictions": {}})
            entry["predictions"][task] = probability
        return list(by_seq.values())

    def patient_ids(self, db) -> list[str]:
        return [r[0] for r in db.execute("SELECT DISTINCT patient_id FROM events ORDER BY patient_id").fetchall()]

    # ----- tokens and audit ------------------------------------------------------------------------------------------
    def create_token(self, name: str, scopes: list[str]) -> str:
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise MedstateError(f"scopes must be some of {', '.join(SCOPES)}, got {', '.join(scopes) or 'none'}")
        token = "mst_" + secrets.token_urlsafe(32)
        with self.transaction() as db:
            if db.execute("SELECT 1 FROM tokens WHERE name = ?", (name,)).fetchone():
                raise MedstateError(f"a token named {name!r} exists; revoke it or choose another name")
            db.execute("INSERT INTO tokens (name, digest, scopes, created_at) VALUES (?, ?, ?, ?)",
                       (name, _digest(token), ",".join(sorted(set(scopes))), now()))  # fmt: skip
        return token

    def revoke_token(self, name: str) -> None:
        with self.transaction() as db:
            row = db.execute("SELECT revoked_at FROM tokens WHERE name = ?", (name,)).fetchone()
            if row is None:
                raise MedstateError(f"no token named {name!r}")
            db.execute("UPDATE tokens SET revoked_at = ? WHERE name = ?", (now(), name))

    def list_tokens(self) -> list[dict]:
        with self.transaction(write=False) as db:
            rows = db.execute("SELECT name, scopes, created_at, revoked_at FROM tokens ORDER BY name").fetchall()
        return [{"name": n, "scopes": s, "created_at": c, "revoked_at": r} for n, s, c, r in rows]

    def principal(self, token: str) -> Principal | None:
        """Who holds this token (None: unknown or revoked)."""
        with self.transaction(write=False) as db:
            row = db.execute(
                "SELECT name, scopes FROM tokens WHERE digest = ? AND revoked_at IS NULL", (_digest(token),)
            ).fetchone()
        return None if row is None else Principal(row[0], frozenset(row[1].split(",")))

    def audit(self, db, actor: str, action: str, patient_id: str | None) -> None:
        db.execute("INSERT INTO audit (at, actor, action, patient_id) VALUES (?, ?, ?, ?)",
                   (now(), actor, action, patient_id))  # fmt: skip

    def audit_log(self, patient_id: str | None = None) -> list[dict]:
        with self.transaction(write=False) as db:
            where, args = ("WHERE patient_id = ?", (patient_id,)) if patient_id else ("", ())
            rows = db.execute(f"SELECT at, actor, action, patient_id FROM audit {where} ORDER BY id", args).fetchall()
        return [{"at": a, "actor": b, "action": c, "patient_id": d} for a, b, c, d in rows]


class _Cursor:
    """A DB-API cursor that writes `?` placeholders in its dialect's style."""

    def __init__(self, cursor, sql):
        self.cursor, self.sql = cursor, sql

    def execute(self, statement: str, args=()):
        self.cursor.execute(self.sql(statement), args)
        return self.cursor

    def executemany(self, statement: str, rows) -> None:
        if rows:
            self.cursor.executemany(self.sql(statement), rows)


class SQLiteStore(Store):
    kind = "sqlite"

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._writer = threading.Lock()
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.close()
        super().__init__(f"sqlite:///{self.path}")

    def connect(self):
        connection = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        connection.execute("PRAGMA synchronous=FULL")  # an acknowledged event survives a crash of the machine
        connection.execute("PRAGMA busy_timeout=60000")
        return _SQLiteConnection(connection)

    def writing(self):
        # the writers of this process queue on a lock (fair, no busy-waiting on SQLite's lock); other processes
        # wait on the database's lock
        return self._writer

    def begin(self, db, write: bool) -> None:
        # a writer takes the write lock before reading, so patients are never read stale; readers never block
        db.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def lock_patient(self, db, patient_id: str) -> None:
        pass  # BEGIN IMMEDIATE holds the database's write lock


class _SQLiteConnection:
    """sqlite3 in autocommit mode, with BEGIN issued by the store: commit and rollback as statements."""

    def __init__(self, connection: sqlite3.Connection):
        self.connection = connection

    def cursor(self):
        return self.connection.cursor()

    def commit(self) -> None:
        if self.connection.in_transaction:
            self.connection.execute("COMMIT")

    def rollback(self) -> None:
        if self.connection.in_transaction:
            self.connection.execute("ROLLBACK")

    def close(self) -> None:
        self.connection.close()


class PostgresStore(Store):
    kind = "postgresql"
    placeholder = "%s"
    blob, serial = "BYTEA", "BIGSERIAL"

    def __init__(self, url: str):
        try:
            import psycopg
        except ImportError:
            raise MedstateError("PostgreSQL needs psycopg: pip install 'medstate[postgres]'") from None
        self._psycopg = psycopg
        super().__init__(url)

    def connect(self):
        try:
            return self._psycopg.connect(self.url)
        except self._psycopg.OperationalError as err:
            raise MedstateError(f"cannot connect to PostgreSQL: {str(err).splitlines()[0]}") from None

    def lock_patient(self, db, patient_id: str) -> None:
        # a row to lock even for a new patient; the lock is held until the transaction ends
        db.execute("INSERT INTO patients (patient_id, model_version, events, updated_at) VALUES (?, '', 0, ?) "
                   "ON CONFLICT (patient_id) DO NOTHING", (patient_id, now()))  # fmt: skip
        db.execute("SELECT 1 FROM patients WHERE patient_id = ? FOR UPDATE", (patient_id,))


def open_store(url: str | Path) -> Store:
    """`postgresql://…` → PostgreSQL; `sqlite:///path`, or a plain path → SQLite."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    return SQLiteStore(text.removeprefix("sqlite:///"))
