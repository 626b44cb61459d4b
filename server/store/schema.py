"""The state database's schema, its version, and the steps that brought a SQLite file
written by an earlier Infergate to it.

The schema is written once, in SQL both backends take; PostgreSQL gets it with its
own names for the two types whose SQLite meaning is wider than PostgreSQL's
(:func:`for_postgresql`). Version 10 is where PostgreSQL started: the steps below it
are SQLite's own history; a later version is a step both backends take at start, in
the transaction that checks the version (``ADDED_COLUMNS``, then the schema again
for its new tables).
"""

from __future__ import annotations

import re
import sqlite3

from infergate.store.connection import Connection

# Jobs, results and deliveries as of version 6 (the work model): their states are the
# values of the enums in infergate.work.states.
WORK_SCHEMA = """
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
    replayed_to TEXT,
    -- the gateway node that claimed its latest attempt (version 11)
    node TEXT
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
    reason TEXT,
    node TEXT  -- the gateway node that claimed its latest attempt (version 11)
);
CREATE INDEX IF NOT EXISTS notifications_due ON notifications(state, next_attempt_at);
-- Version 11: the gateway nodes sharing this database, each beating while it lives;
-- the work a node holds (a running job, a delivery or notification it sends) is
-- taken over by another once its beat is older than work.lease_s.
CREATE TABLE IF NOT EXISTS nodes (
    node TEXT PRIMARY KEY,
    started_at REAL NOT NULL,
    heartbeat_at REAL NOT NULL,
    version TEXT NOT NULL
);
"""

SCHEMA = """
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
    process_id INTEGER NOT NULL DEFAULT 0,
    node TEXT NOT NULL DEFAULT ''  -- the gateway node it came to (version 11)
);
"""

# The open associations, counted on every association request by every listener process.
OPEN_ASSOCIATIONS_INDEX = (
    "CREATE INDEX IF NOT EXISTS associations_open ON associations(peer_address)"
    " WHERE ended_at IS NULL"
)
VERSION = 11
# What each version after 10 added, which both backends add at start (a table new in
# it is in the schema above, which they run again).
ADDED_COLUMNS: dict[int, dict[tuple[str, str], str]] = {
    # the node that claims a delivery or notification, and that an association came to
    11: {
        ("deliveries", "node"): "TEXT",
        ("notifications", "node"): "TEXT",
        ("associations", "node"): "TEXT NOT NULL DEFAULT ''",
    },
}


def migrate_sqlite(db: sqlite3.Connection) -> None:
    """Bring a database written by an earlier Infergate to this schema."""
    if db.execute("PRAGMA user_version").fetchone()[0] >= VERSION:
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
    execute_script(db, WORK_SCHEMA)  # version 9: the notifications table
    _add_columns(db, {("jobs", "node"): "TEXT"})  # version 10: the node that ran a job
    for version in sorted(ADDED_COLUMNS):
        _add_columns(db, ADDED_COLUMNS[version])
    execute_script(db, SCHEMA)
    execute_script(db, WORK_SCHEMA)
    db.execute(f"PRAGMA user_version = {VERSION}")


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
    execute_script(db, WORK_SCHEMA)  # the tables as they are now
    for table in tables:
        columns = ", ".join(row[1] for row in db.execute(f"PRAGMA table_info({table}_v7)"))
        db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_v7")  # noqa: S608 - our own names
    for table in reversed(tables):
        db.execute(f"DROP TABLE {table}_v7")
    execute_script(db, WORK_SCHEMA)  # their indexes, which went with the old tables


def _add_columns(db: sqlite3.Connection, added: dict[tuple[str, str], str]) -> None:
    """Each (table, column) with its definition, unless the table has it already."""
    for (table, column), definition in added.items():
        if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")


def execute_script(db: Connection, script: str) -> None:
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
    execute_script(db, WORK_SCHEMA)
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


def for_postgresql(script: str) -> str:
    """``script`` in PostgreSQL's types: SQLite's INTEGER holds 64 bits and its REAL is
    a double, where PostgreSQL's are 32 bits and single precision (a byte count or an
    epoch time in seconds would not fit, or would lose its fraction)."""
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", re.sub(r"\bINTEGER\b", "BIGINT", script))
