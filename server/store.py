"""The state store: instances, series, jobs and results, in SQLite.

WAL journal with ``synchronous=FULL``: a commit that returned survives a crash of
the process or the machine, which is what lets ingest acknowledge an instance only
after its row is committed. One connection is shared by every thread behind a lock;
each public method is one transaction.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infergate.errors import StoreError
from infergate.store_rows import (
    Arrival,
    ArrivalOutcome,
    AssociationAudit,
    InstanceRecord,
    JobRow,
    NewJob,
    ResultRow,
    SeriesRow,
)

__all__ = [
    "Arrival",
    "ArrivalOutcome",
    "AssociationAudit",
    "InstanceRecord",
    "JobRow",
    "NewJob",
    "ResultRow",
    "SeriesRow",
    "Store",
]

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
CREATE INDEX IF NOT EXISTS instances_by_series ON instances(series_uid);
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
    generation INTEGER NOT NULL DEFAULT 0
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
    failures INTEGER NOT NULL DEFAULT 0
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
    sent_at REAL
);
"""


class Store:
    """Typed access to the state database. Safe to share between threads."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc

    def _migrate(self) -> None:
        """Bring a database written by an earlier Infergate to this schema."""
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            columns = {row[1] for row in self._db.execute("PRAGMA table_info(instances)")}
            if "sha256" not in columns:  # written before duplicate detection existed
                self._db.execute("ALTER TABLE instances ADD COLUMN sha256 TEXT NOT NULL DEFAULT ''")
            self._db.execute("PRAGMA user_version = 1")

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

    # -- ingest -----------------------------------------------------------------

    def record_instance(
        self, rec: InstanceRecord, *, replace_changed: bool = False, now: float | None = None
    ) -> ArrivalOutcome:
        """Commit a received instance and say what it was.

        A SOP Instance UID already stored with the same bytes is a duplicate and
        changes nothing. With other bytes, the first instance stays unless
        ``replace_changed``; a replacement reopens its series. A new instance for a
        complete series reopens it as a new generation, so its jobs run again over
        the whole series.
        """
        at = time.time() if now is None else now
        with self._transaction() as db:
            known = db.execute(
                "SELECT sha256, path, series_uid FROM instances WHERE sop_instance_uid = ?",
                (rec.sop_instance_uid,),
            ).fetchone()
            if known is not None:
                if known[0] == rec.sha256:
                    return ArrivalOutcome(Arrival.DUPLICATE)
                if not replace_changed:
                    return ArrivalOutcome(Arrival.CHANGED_KEPT)
                db.execute(
                    "DELETE FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,)
                )
                db.execute(
                    "UPDATE series SET instance_count = instance_count - 1 WHERE series_uid = ?",
                    (known[2],),
                )
            db.execute(
                "INSERT INTO instances (sop_instance_uid, sop_class_uid, series_uid, study_uid,"
                " path, size, association_id, received_at, sha256)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    rec.sop_instance_uid,
                    rec.sop_class_uid,
                    rec.series_uid,
                    rec.study_uid,
                    str(rec.path),
                    rec.size,
                    rec.association_id,
                    at,
                    rec.sha256,
                ),
            )
            db.execute(
                """
                INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'receiving', 0)
                ON CONFLICT (series_uid) DO UPDATE SET
                    last_received_at = excluded.last_received_at,
                    instance_count = instance_count + 1,
                    generation = generation + (state = 'complete'),
                    state = 'receiving'
                """,
                (
                    rec.series_uid,
                    rec.study_uid,
                    rec.modality,
                    rec.calling_ae,
                    rec.called_ae,
                    at,
                    at,
                ),
            )
            if known is not None:
                return ArrivalOutcome(Arrival.CHANGED_REPLACED, superseded_path=Path(known[1]))
            return ArrivalOutcome(Arrival.NEW)

    def audit_association(self, audit: AssociationAudit) -> None:
        """Record an association when it is accepted or rejected."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO associations VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    audit.association_id,
                    audit.peer_address,
                    audit.peer_port,
                    audit.calling_ae,
                    audit.called_ae,
                    int(audit.tls),
                    audit.outcome,
                    audit.reason,
                    audit.started_at,
                    audit.ended_at,
                    audit.instances,
                    audit.bytes,
                    audit.failures,
                ),
            )

    def close_association(
        self,
        association_id: str,
        outcome: str,
        *,
        instances: int,
        size: int,
        failures: int,
        now: float,
    ) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE associations SET outcome = ?, instances = ?, bytes = ?, failures = ?,"
                " ended_at = ? WHERE association_id = ?",
                (outcome, instances, size, failures, now, association_id),
            )

    def associations(self) -> list[AssociationAudit]:
        with self._lock:
            rows = self._db.execute(
                "SELECT association_id, peer_address, peer_port, calling_ae, called_ae, tls,"
                " outcome, reason, started_at, ended_at, instances, bytes, failures"
                " FROM associations ORDER BY started_at"
            ).fetchall()
        return [AssociationAudit(r[0], r[1], r[2], r[3], r[4], bool(r[5]), *r[6:]) for r in rows]

    # -- assembly ---------------------------------------------------------------

    def receiving_series(self) -> list[SeriesRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT series_uid, study_uid, modality, calling_ae, called_ae,"
                " last_received_at, instance_count, generation"
                " FROM series WHERE state = 'receiving' ORDER BY last_received_at"
            ).fetchall()
        return [SeriesRow(*row) for row in rows]

    def complete_series(self, series: SeriesRow, jobs: list[NewJob], now: float) -> bool:
        """Mark a series complete and create its jobs, in one transaction.

        Returns False (and changes nothing) when an instance arrived since ``series``
        was read, so the caller decides again later.
        """
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE series SET state = 'complete'"
                " WHERE series_uid = ? AND state = 'receiving'"
                " AND last_received_at = ? AND generation = ?",
                (series.series_uid, series.last_received_at, series.generation),
            )
            if cur.rowcount == 0:
                return False
            db.executemany(
                "INSERT INTO jobs (job_id, series_uid, study_uid, generation, plugin, state,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
                [
                    (
                        job.job_id,
                        series.series_uid,
                        series.study_uid,
                        series.generation,
                        job.plugin,
                        now,
                        now,
                    )
                    for job in jobs
                ],
            )
            return True

    def instance_paths(self, series_uid: str) -> list[Path]:
        with self._lock:
            rows = self._db.execute(
                "SELECT path FROM instances WHERE series_uid = ? ORDER BY received_at",
                (series_uid,),
            ).fetchall()
        return [Path(row[0]) for row in rows]

    # -- jobs -------------------------------------------------------------------

    def runnable_jobs(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, series_uid, study_uid, plugin, state, attempts, error"
                " FROM jobs WHERE state = 'pending' ORDER BY created_at"
            ).fetchall()
        return [JobRow(*row) for row in rows]

    def start_job(self, job_id: str, now: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ?"
                " WHERE job_id = ?",
                (now, job_id),
            )

    def fail_job(self, job_id: str, error: str, now: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'failed', error = ?, updated_at = ? WHERE job_id = ?",
                (error, now, job_id),
            )

    def finish_job(self, job_id: str, results: list[ResultRow], now: float) -> None:
        """Record a job's result files and mark it done, in one transaction."""
        with self._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO results (sop_instance_uid, job_id, kind, path, state,"
                " created_at) VALUES (?, ?, ?, ?, 'pending', ?)",
                [(r.sop_instance_uid, job_id, r.kind, str(r.path), now) for r in results],
            )
            db.execute(
                "UPDATE jobs SET state = 'done', error = NULL, updated_at = ? WHERE job_id = ?",
                (now, job_id),
            )

    def recover(self, now: float) -> int:
        """Put back what a dead process left: returns how many running jobs were requeued.

        Series still receiving get a fresh quiet period from ``now``: their senders
        could not reach us while we were down, and completing them at once would run
        a job on part of a series and another when the rest arrives.
        """
        with self._transaction() as db:
            db.execute(
                "UPDATE series SET last_received_at = ?"
                " WHERE state = 'receiving' AND last_received_at < ?",
                (now, now),
            )
            cur = db.execute(
                "UPDATE jobs SET state = 'pending', updated_at = ? WHERE state = 'running'",
                (now,),
            )
            return cur.rowcount

    def job(self, job_id: str) -> JobRow:
        with self._lock:
            row = self._db.execute(
                "SELECT job_id, series_uid, study_uid, plugin, state, attempts, error"
                " FROM jobs WHERE job_id = ?",
                (job_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id} in the state store")
        return JobRow(*row)

    def jobs(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT job_id, series_uid, study_uid, plugin, state, attempts, error"
                " FROM jobs ORDER BY created_at"
            ).fetchall()
        return [JobRow(*row) for row in rows]

    # -- export -----------------------------------------------------------------

    def pending_results(self) -> list[ResultRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, job_id, kind, path, state, attempts FROM results"
                " WHERE state = 'pending' ORDER BY created_at, kind"
            ).fetchall()
        return [ResultRow(r[0], r[1], r[2], Path(r[3]), r[4], r[5]) for r in rows]

    def mark_results_sent(self, uids: list[str], now: float) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE results SET state = 'sent', sent_at = ?, attempts = attempts + 1,"
                " error = NULL WHERE sop_instance_uid = ?",
                [(now, uid) for uid in uids],
            )

    def mark_results_attempted(self, uids: list[str], error: str, give_up: bool) -> None:
        with self._transaction() as db:
            db.executemany(
                "UPDATE results SET attempts = attempts + 1, error = ?, state = ?"
                " WHERE sop_instance_uid = ?",
                [(error, "failed" if give_up else "pending", uid) for uid in uids],
            )

    def results(self) -> list[ResultRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT sop_instance_uid, job_id, kind, path, state, attempts FROM results"
                " ORDER BY created_at"
            ).fetchall()
        return [ResultRow(r[0], r[1], r[2], Path(r[3]), r[4], r[5]) for r in rows]
