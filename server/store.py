"""The state store: instances, series, jobs and results, in SQLite.

The connection, schema and durability settings are in ``store_db``, the association
audit trail in ``store_associations``. Each public method is one transaction.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from infergate.errors import StoreError
from infergate.routing_rules import Priority
from infergate.store_associations import AssociationRecords
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


class Store(AssociationRecords):
    """Typed access to the state database. Safe to share between threads."""

    # -- ingest -----------------------------------------------------------------

    def record_instance(
        self, rec: InstanceRecord, *, replace_changed: bool = False, now: float | None = None
    ) -> ArrivalOutcome:
        """Commit a received instance and say what it was (see ``record_instances``)."""
        return self.record_instances([rec], replace_changed=replace_changed, now=now)[0]

    def record_instances(
        self,
        records: list[InstanceRecord],
        *,
        replace_changed: bool = False,
        now: float | None = None,
    ) -> list[ArrivalOutcome]:
        """Commit received instances in one transaction and say what each was, in order.

        A SOP Instance UID already stored with the same bytes is a duplicate and
        changes nothing. With other bytes, the first instance stays unless
        ``replace_changed``; a replacement reopens its series. A new instance for a
        complete series reopens it as a new generation, so its jobs run again over
        the whole series. Two records with one SOP Instance UID are taken in order.
        """
        at = time.time() if now is None else now
        with self._transaction() as db:
            return [_record_instance(db, rec, replace_changed, at) for rec in records]

    # -- assembly ---------------------------------------------------------------

    def receiving_series(self) -> list[SeriesRow]:
        rows = self._rows(
            """
            SELECT s.series_uid, s.study_uid, s.modality, s.calling_ae, s.called_ae,
                s.last_received_at, s.instance_count, s.generation, s.first_received_at,
                s.released_at,
                (SELECT COUNT(*) FROM associations a WHERE a.ended_at IS NULL AND EXISTS (
                    SELECT 1 FROM instances i
                    WHERE i.series_uid = s.series_uid AND i.association_id = a.association_id
                ))
            FROM series s WHERE s.state = 'receiving' ORDER BY s.last_received_at
            """
        )
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
                " created_at, updated_at, priority) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                [
                    (
                        job.job_id,
                        series.series_uid,
                        series.study_uid,
                        series.generation,
                        job.plugin,
                        now,
                        now,
                        PRIORITY_RANK[job.priority],
                    )
                    for job in jobs
                ],
            )
            return True

    def series_instances(self, series_uid: str) -> list[tuple[str, Path]]:
        """SOP Instance UID and spool path of every instance of a series, as received."""
        rows = self._rows(
            "SELECT sop_instance_uid, path FROM instances WHERE series_uid = ?"
            " ORDER BY received_at",
            (series_uid,),
        )
        return [(str(row[0]), Path(row[1])) for row in rows]

    def instance_paths(self, series_uid: str) -> list[Path]:
        return [path for _, path in self.series_instances(series_uid)]

    # -- jobs -------------------------------------------------------------------

    def runnable_jobs(self, now: float | None = None) -> list[JobRow]:
        """Pending jobs in the order they run: urgent ones first, then by age; a job
        waiting to be retried is not runnable before its time."""
        rows = self._rows(
            f"SELECT {_JOB_COLUMNS} {_RUNNABLE}",
            (time.time() if now is None else now,),
        )
        return [_job(row) for row in rows]

    def next_job(self, now: float | None = None) -> JobRow | None:
        """The job to run next, if any (the first of ``runnable_jobs``)."""
        rows = self._rows(
            f"SELECT {_JOB_COLUMNS} {_RUNNABLE} LIMIT 1",
            (time.time() if now is None else now,),
        )
        return _job(rows[0]) if rows else None

    def start_job(self, job_id: str, now: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'running', attempts = attempts + 1, updated_at = ?"
                " WHERE job_id = ?",
                (now, job_id),
            )

    def retry_job(self, job_id: str, error: str, not_before: float, now: float) -> None:
        """Put a job back in the queue, to run again no sooner than ``not_before``."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = 'pending', error = ?, not_before = ?, updated_at = ?"
                " WHERE job_id = ?",
                (error, not_before, now, job_id),
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
                " created_at, priority) VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                [
                    (
                        r.sop_instance_uid,
                        job_id,
                        r.kind,
                        str(r.path),
                        now,
                        PRIORITY_RANK[r.priority],
                    )
                    for r in results
                ],
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
                f"SELECT {_JOB_COLUMNS} FROM jobs WHERE job_id = ?",  # noqa: S608 - constant
                (job_id,),
            ).fetchone()
        if row is None:
            raise StoreError(f"no job {job_id} in the state store")
        return _job(row)

    def jobs(self) -> list[JobRow]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs ORDER BY created_at"  # noqa: S608 - constant
            ).fetchall()
        return [_job(row) for row in rows]

    # -- export -----------------------------------------------------------------

    def called_ae_of_job(self, job_id: str) -> str:
        """The called AE title the job's series was sent to (its first instance's)."""
        rows = self._rows(
            "SELECT s.called_ae FROM jobs j JOIN series s ON s.series_uid = j.series_uid"
            " WHERE j.job_id = ?",
            (job_id,),
        )
        if not rows:
            raise StoreError(f"no job {job_id} in the state store")
        return str(rows[0][0])

    def pending_results(self) -> list[ResultRow]:
        """Results not yet delivered, urgent ones first, then oldest first."""
        rows = self._rows(
            f"SELECT {_RESULT_COLUMNS} FROM results"  # noqa: S608 - constant
            " WHERE state = 'pending' ORDER BY priority, created_at, kind"
        )
        return [_result(row) for row in rows]

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
        rows = self._rows(
            f"SELECT {_RESULT_COLUMNS} FROM results ORDER BY created_at"  # noqa: S608 - constant
        )
        return [_result(row) for row in rows]


def _record_instance(
    db: sqlite3.Connection, rec: InstanceRecord, replace_changed: bool, at: float
) -> ArrivalOutcome:
    known = db.execute(
        "SELECT sha256, path, series_uid FROM instances WHERE sop_instance_uid = ?",
        (rec.sop_instance_uid,),
    ).fetchone()
    if known is not None:
        if known[0] == rec.sha256:
            return ArrivalOutcome(Arrival.DUPLICATE)
        if not replace_changed:
            return ArrivalOutcome(Arrival.CHANGED_KEPT)
        db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (rec.sop_instance_uid,))
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
        INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, 1, 'receiving', 0, NULL)
        ON CONFLICT (series_uid) DO UPDATE SET
            last_received_at = excluded.last_received_at,
            instance_count = instance_count + 1,
            generation = generation + (state = 'complete'),
            first_received_at = CASE WHEN state = 'complete'
                THEN excluded.first_received_at ELSE first_received_at END,
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


_JOB_COLUMNS = "job_id, series_uid, study_uid, plugin, state, attempts, error, priority"
_RUNNABLE = (
    "FROM jobs WHERE state = 'pending' AND (not_before IS NULL OR not_before <= ?)"
    " ORDER BY priority, created_at"
)
PRIORITY_RANK: dict[Priority, int] = {"urgent": 0, "normal": 1}
_PRIORITY_NAME: dict[int, Priority] = {rank: name for name, rank in PRIORITY_RANK.items()}


def _job(row: tuple[Any, ...]) -> JobRow:
    job_id, series_uid, study_uid, plugin, state, attempts, error, rank = row
    return JobRow(
        job_id, series_uid, study_uid, plugin, state, attempts, error, _PRIORITY_NAME[rank]
    )


_RESULT_COLUMNS = "sop_instance_uid, job_id, kind, path, state, attempts, priority"


def _result(row: tuple[Any, ...]) -> ResultRow:
    uid, job_id, kind, path, state, attempts, rank = row
    return ResultRow(uid, job_id, kind, Path(path), state, attempts, _PRIORITY_NAME[rank])
