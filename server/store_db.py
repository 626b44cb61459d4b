"""The state database: one SQLite connection, its schema and its migrations.

WAL journal with ``synchronous=FULL``: a commit that returned survives a crash of
the process or the machine, which is what lets ingest acknowledge an instance only
after its row is committed. Several processes open the same file (the listener
processes and the worker); SQLite serialises their write transactions, each of
which starts with ``BEGIN IMMEDIATE`` so that what it reads cannot change before it
writes. Within a process, one connection is shared by every thread behind a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from infergate.errors import StoreError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    association_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    sha256 TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid, association_id);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    instance_count INTEGER NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('receiving', 'complete')),
    generation INTEGER NOT NULL DEFAULT 0,
    released_at REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    plugin TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    priority INTEGER NOT NULL DEFAULT 1,
    not_before REAL,
    UNIQUE (series_uid, generation, plugin)
);
CREATE TABLE IF NOT EXISTS associations (
    association_id TEXT PRIMARY KEY,
    peer_address TEXT NOT NULL,
    peer_port INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    called_ae TEXT NOT NULL,
    tls INTEGER NOT NULL,
    outcome TEXT NOT NULL
        CHECK (outcome IN ('accepted', 'rejected', 'released', 'aborted')),
    reason TEXT,
    started_at REAL NOT NULL,
    ended_at REAL,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    process_id INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    sent_at REAL,
    priority INTEGER NOT NULL DEFAULT 1
);
"""

# The open associations, counted on every association request by every listener process.
_OPEN_ASSOCIATIONS_INDEX = (
    "CREATE INDEX IF NOT EXISTS associations_open ON associations(peer_address)"
    " WHERE ended_at IS NULL"
)
_VERSION = 5


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier Infergate to this schema."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= _VERSION:
        return
    added = {
        # duplicate detection (version 1), listener processes (2), release hint (3),
        # job priority (4: 0 urgent, 1 normal), result priority and job retry time (5)
        ("instances", "sha256"): "TEXT NOT NULL DEFAULT ''",
        ("associations", "process_id"): "INTEGER NOT NULL DEFAULT 0",
        ("series", "released_at"): "REAL",
        ("jobs", "priority"): "INTEGER NOT NULL DEFAULT 1",
        ("results", "priority"): "INTEGER NOT NULL DEFAULT 1",
        ("jobs", "not_before"): "REAL",
    }
    for (table, column), definition in added.items():
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
    # Version 3 finds, for a series, the associations that sent it.
    db.execute("DROP INDEX IF EXISTS instances_by_series")
    db.execute("CREATE INDEX instances_by_series ON instances(series_uid, association_id)")
    db.execute(f"PRAGMA user_version = {_VERSION}")


class Database:
    """The connection, its lock and transactions; the tables' methods live in subclasses."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)  # idempotent
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        with self._transaction() as db:  # one process migrates; the others then see it done
            _migrate(db)
            db.execute(_OPEN_ASSOCIATIONS_INDEX)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"state store transaction failed: {exc}") from exc

    def _rows(self, sql: str, parameters: tuple[Any, ...] = ()) -> list[Any]:
        """The rows of one read, under the lock."""
        with self._lock:
            try:
                return self._db.execute(sql, parameters).fetchall()
            except sqlite3.Error as exc:
                raise StoreError(f"state store read failed: {exc}") from exc
