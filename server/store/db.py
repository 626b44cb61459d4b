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
from infergate.work.states import State, allowed

# Jobs, results and deliveries as of version 6 (the work model): their states are the
# values of the enums in infergate.work.states.
_WORK_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('inference', 'forward')),
    plugin TEXT NOT NULL,  -- '' for a forward job
    state TEXT NOT NULL CHECK (state IN ('queued', 'running', 'done', 'failed', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    -- runs cut short by a process death; at work.max_interruptions the job is dead
    interruptions INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    started_at REAL,
    priority INTEGER NOT NULL DEFAULT 1,
    not_before REAL,
    -- why it runs: routing's decision and how its series was completed (JSON)
    route TEXT,
    -- a done job's stage durations in seconds (JSON)
    timings TEXT,
    -- the gateway node (node.name) that started its latest attempt (version 10)
    node TEXT,
    UNIQUE (series_uid, generation, kind, plugin)
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs(state, priority, created_at);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    kind TEXT NOT NULL CHECK (kind IN ('seg', 'sr', 'forwarded', 'sc')),
    path TEXT NOT NULL,
    created_at REAL NOT NULL,
    priority INTEGER NOT NULL DEFAULT 1,
    -- set once the outbox has put it into a delivery (or kept it: no destination)
    planned_at REAL,
    kept_reason TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    destination_ae TEXT NOT NULL,
    destination_host TEXT NOT NULL,
    destination_port INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'sending', 'retry_wait', 'delivered', 'dead')),
    priority INTEGER NOT NULL DEFAULT 1,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    outcome TEXT,  -- the class of the last attempt's outcome
    reason TEXT,
    finished_at REAL,
    -- a dead letter an operator replayed: the delivery that carries its objects now
    replayed_to TEXT
);
-- One open delivery per study and destination: what becomes ready joins it.
CREATE UNIQUE INDEX IF NOT EXISTS deliveries_open ON deliveries(
    study_uid, destination_ae, destination_host, destination_port, calling_ae
) WHERE state IN ('pending', 'retry_wait');
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, priority, next_attempt_at);
CREATE TABLE IF NOT EXISTS delivery_items (
    delivery_id TEXT NOT NULL REFERENCES deliveries(delivery_id),
    sop_instance_uid TEXT NOT NULL REFERENCES results(sop_instance_uid),
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivered', 'dead', 'replaced')),
    status INTEGER,  -- the destination's C-STORE status, when it answered one
    reason TEXT,
    PRIMARY KEY (delivery_id, sop_instance_uid)
);
-- Version 9: critical findings on their way to people, one row per finding and
-- receiver; the finding as codes (JSON), never patient data.
CREATE TABLE IF NOT EXISTS notifications (
    notification_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL REFERENCES jobs(job_id),
    receiver TEXT NOT NULL,
    finding TEXT NOT NULL,
    report_uid TEXT NOT NULL REFERENCES results(sop_instance_uid),
    state TEXT NOT NULL
        CHECK (state IN ('pending', 'sending', 'retry_wait', 'delivered', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL,
    reason TEXT
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(state, next_attempt_at);
"""

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
"""

# The open associations, counted on every association request by every listener process.
_OPEN_ASSOCIATIONS_INDEX = (
    "CREATE INDEX IF NOT EXISTS associations_open ON associations(peer_address)"
    " WHERE ended_at IS NULL"
)
_VERSION = 10


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
    _add_columns(db, added)
    # Version 3 finds, for a series, the associations that sent it.
    db.execute("DROP INDEX IF EXISTS instances_by_series")
    db.execute("CREATE INDEX instances_by_series ON instances(series_uid, association_id)")
    if "kind" not in {row[1] for row in db.execute("PRAGMA table_info(jobs)")}:
        _to_work_model(db)
    # Version 7: what an operator sees of a job (its route, its stage times) and replays.
    _add_columns(
        db,
        {
            ("jobs", "route"): "TEXT",
            ("jobs", "timings"): "TEXT",
            ("deliveries", "replayed_to"): "TEXT",
        },
    )
    if "'sc'" not in _table_sql(db, "results"):
        _to_secondary_captures(db)
    _execute_script(db, _WORK_SCHEMA)  # version 9: the notifications table
    _add_columns(db, {("jobs", "node"): "TEXT"})  # version 10: the node that ran a job
    db.execute(f"PRAGMA user_version = {_VERSION}")


def _table_sql(db: sqlite3.Connection, table: str) -> str:
    row = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
    return "" if row is None else str(row[0])


def _to_secondary_captures(db: sqlite3.Connection) -> None:
    """Version 8: results may be Secondary Capture images (kind 'sc') and an object of a
    delivery replaced by them (state 'replaced'). SQLite changes a CHECK by rebuilding
    the table: each is copied into one made by today's schema, inside this transaction,
    foreign keys checked at its commit (delivery_items refers to results)."""
    db.execute("PRAGMA defer_foreign_keys = ON")
    tables = ("results", "delivery_items")  # referred to first
    for table in tables:
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_v7")
    _execute_script(db, _WORK_SCHEMA)  # the tables as they are now
    for table in tables:
        columns = ", ".join(row[1] for row in db.execute(f"PRAGMA table_info({table}_v7)"))
        db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_v7")  # noqa: S608 - our own names
    for table in reversed(tables):
        db.execute(f"DROP TABLE {table}_v7")
    _execute_script(db, _WORK_SCHEMA)  # their indexes, which went with the old tables


def _add_columns(db: sqlite3.Connection, added: dict[tuple[str, str], str]) -> None:
    """Each (table, column) with its definition, unless the table has it already."""
    for (table, column), definition in added.items():
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def _execute_script(db: sqlite3.Connection, script: str) -> None:
    """Each statement of ``script`` inside the transaction open on ``db``
    (``executescript`` would commit it first)."""
    for statement in script.split(";\n"):
        if statement.strip():
            db.execute(statement)


def _to_work_model(db: sqlite3.Connection) -> None:
    """Version 6: jobs get a kind and the work model's states; results lose their own
    delivery state to the outbox, which plans every result not yet sent (those that
    gave up under the old five tries included) into a delivery of its own."""
    db.execute("ALTER TABLE jobs RENAME TO jobs_v5")
    db.execute("ALTER TABLE results RENAME TO results_v5")
    _execute_script(db, _WORK_SCHEMA)
    db.execute(
        "INSERT INTO jobs (job_id, series_uid, study_uid, generation, kind, plugin, state,"
        " attempts, error, created_at, updated_at, priority, not_before)"
        " SELECT job_id, series_uid, study_uid, generation,"
        " CASE plugin WHEN '(forward)' THEN 'forward' ELSE 'inference' END,"
        " CASE plugin WHEN '(forward)' THEN '' ELSE plugin END,"
        " CASE state WHEN 'pending' THEN 'queued' ELSE state END,"
        " attempts, error, created_at, updated_at, priority, not_before FROM jobs_v5"
    )
    db.execute(
        "INSERT INTO results (sop_instance_uid, job_id, kind, path, created_at, priority,"
        " planned_at) SELECT sop_instance_uid, job_id, kind, path, created_at, priority,"
        " CASE state WHEN 'sent' THEN sent_at END FROM results_v5"
    )
    db.execute("DROP TABLE results_v5")
    db.execute("DROP TABLE jobs_v5")


def set_state(
    db: sqlite3.Connection,
    table: str,
    key: tuple[str, str] | None,
    old: tuple[State, ...],
    new: State,
    *,
    assignments: str = "",
    parameters: tuple[Any, ...] = (),
) -> int:
    """Move the row ``key`` (column, value) of ``table`` (every row, when None) from
    one of the states ``old`` to ``new``, setting ``assignments`` too; returns how many
    rows changed (none when the row is in another state now).

    Raises :class:`StoreError` for a transition the table does not list: a bug.
    """
    for source in old:
        if not allowed(source, new):
            raise StoreError(f"{table}: {source.value} -> {new.value} is not a transition")
    extra = f", {assignments}" if assignments else ""
    where = "" if key is None else f"{key[0]} = ? AND "
    cur = db.execute(
        f"UPDATE {table} SET state = ?{extra}"  # noqa: S608 - constant fragments
        f" WHERE {where}state IN ({', '.join('?' * len(old))})",
        (new.value, *parameters, *(() if key is None else (key[1],)), *(s.value for s in old)),
    )
    return cur.rowcount


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
            if not self._has_old_jobs_table():
                self._db.executescript(_WORK_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        with self._transaction() as db:  # one process migrates; the others then see it done
            _migrate(db)
            db.execute(_OPEN_ASSOCIATIONS_INDEX)

    def _has_old_jobs_table(self) -> bool:
        """A jobs table from before the work model (version 6), which ``_migrate``
        converts; a new or current database gets the work tables at once."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        return bool(columns) and "kind" not in columns

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
