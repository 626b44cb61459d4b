"""The state store: instances, series and jobs, in SQLite or PostgreSQL.

The connection is in ``store.db``, the schema in ``store.schema``, the two backends in
``store.sqlite`` and ``store.postgres``; the association audit trail in
``store.associations``, the outbox (results and their deliveries) in ``store.outbox``,
what is finished and its removal in ``store.retention``, what the ops endpoint gauges
in ``store.gauges`` and what an operator sees in ``store.views``. Each public method is
one transaction.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from infergate.errors import NotFoundError, RefusedError
from infergate.store.associations import AssociationRecords
from infergate.store.connection import Connection
from infergate.store.db import set_state
from infergate.store.gauges import GaugeRecords, PipelineGauges
from infergate.store.nodes import NodeRecords, NodeRow, NodeView, Recovered
from infergate.store.notifications import NotificationRecords, add_notifications
from infergate.store.retention import RetentionRecords
from infergate.store.rows import (
    Arrival,
    ArrivalOutcome,
    AssociationAudit,
    CriticalFinding,
    DeliveryItem,
    DeliveryRow,
    InstanceRecord,
    JobRow,
    NewJob,
    NotificationRow,
    NotificationView,
    ResultRow,
    SeriesRow,
    UnplannedResult,
)
from infergate.store.views import ViewRecords
from infergate.work.states import (
    PRIORITY_OF_RANK,
    PRIORITY_RANK,
    JobKind,
    JobState,
    SeriesState,
)

__all__ = [
    "Arrival",
    "ArrivalOutcome",
    "AssociationAudit",
    "CriticalFinding",
    "DeliveryItem",
    "DeliveryRow",
    "InstanceRecord",
    "JobRow",
    "NewJob",
    "NodeRow",
    "NodeView",
    "NotificationRow",
    "NotificationView",
    "PipelineGauges",
    "Recovered",
    "ResultRow",
    "SeriesRow",
    "Store",
    "UnplannedResult",
]


class Store(
    AssociationRecords,
    ViewRecords,
    RetentionRecords,
    GaugeRecords,
    NotificationRecords,
    NodeRecords,
):
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
            FROM series s WHERE s.state = ? ORDER BY s.last_received_at
            """,
            (SeriesState.RECEIVING.value,),
        )
        return [SeriesRow(*row) for row in rows]

    def complete_series(self, series: SeriesRow, jobs: list[NewJob], now: float) -> bool:
        """Mark a series complete and create its jobs, in one transaction.

        Returns False (and changes nothing) when an instance arrived since ``series``
        was read, so the caller decides again later.
        """
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE series SET state = ?"
                " WHERE series_uid = ? AND state = ? AND last_received_at = ? AND generation = ?",
                (
                    SeriesState.COMPLETE.value,
                    series.series_uid,
                    SeriesState.RECEIVING.value,
                    series.last_received_at,
                    series.generation,
                ),
            )
            if cur.rowcount == 0:
                return False
            db.executemany(
                "INSERT INTO jobs (job_id, series_uid, study_uid, generation, kind, plugin, state,"
                " created_at, updated_at, priority, route)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        job.job_id,
                        series.series_uid,
                        series.study_uid,
                        series.generation,
                        job.kind.value,
                        job.plugin,
                        JobState.QUEUED.value,
                        now,
                        now,
                        PRIORITY_RANK[job.priority],
                        job.route,
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

    def series_bytes(self, series_uid: str) -> int:
        """What the series' instances take on disk: what a job's memory need is judged by."""
        rows = self._rows(
            "SELECT COALESCE(SUM(size), 0) FROM instances WHERE series_uid = ?", (series_uid,)
        )
        return int(rows[0][0])

    # -- jobs -------------------------------------------------------------------

    def runnable_jobs(self, now: float | None = None) -> list[JobRow]:
        """Queued jobs in the order they run: urgent ones first, then by age; a job
        waiting to be retried is not runnable before its time."""
        rows = self._rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE state = ?"  # noqa: S608 - constant
            " AND (not_before IS NULL OR not_before <= ?) ORDER BY priority, created_at",
            (JobState.QUEUED.value, time.time() if now is None else now),
        )
        return [_job(row) for row in rows]

    @staticmethod
    def _set_job_state(
        db: Connection,
        job_id: str,
        old: tuple[JobState, ...],
        new: JobState,
        *,
        assignments: str,
        parameters: tuple[Any, ...],
        holder: str | None = None,
    ) -> bool:
        changed = set_state(
            db,
            "jobs",
            ("job_id", job_id),
            old,
            new,
            assignments=assignments,
            parameters=parameters,
            holder=holder,
        )
        return changed == 1

    def start_job(self, job_id: str, now: float, node: str | None = None) -> bool:
        """Queued → running on ``node`` (the gateway node's name); False if the job is
        no longer queued."""
        with self._transaction() as db:
            return self._set_job_state(
                db,
                job_id,
                (JobState.QUEUED,),
                JobState.RUNNING,
                assignments="attempts = attempts + 1, updated_at = ?, started_at = ?, node = ?",
                parameters=(now, now, node),
            )

    def retry_job(
        self, job_id: str, error: str, not_before: float, now: float, node: str | None = None
    ) -> bool:
        """Running → queued, to run again no sooner than ``not_before``; with ``node``,
        only while that node holds it (see ``store.nodes``)."""
        with self._transaction() as db:
            return self._set_job_state(
                db,
                job_id,
                (JobState.RUNNING,),
                JobState.QUEUED,
                assignments="error = ?, not_before = ?, updated_at = ?",
                parameters=(error, not_before, now),
                holder=node,
            )

    def fail_job(self, job_id: str, error: str, now: float, node: str | None = None) -> bool:
        """Queued or running → failed, with the reason; False if it had ended already
        (or, with ``node``, if another node holds it now)."""
        with self._transaction() as db:
            return self._set_job_state(
                db,
                job_id,
                (JobState.QUEUED, JobState.RUNNING),
                JobState.FAILED,
                assignments="error = ?, updated_at = ?",
                parameters=(error, now),
                holder=node,
            )

    def finish_job(
        self,
        job_id: str,
        results: list[ResultRow],
        now: float,
        timings_s: dict[str, float] | None = None,
        *,
        critical: tuple[CriticalFinding, ...] = (),
        receivers: tuple[str, ...] = (),
        node: str | None = None,
    ) -> bool:
        """Record a job's result files (and its stage durations) and mark it done, in
        one transaction, with a notification of each ``critical`` finding to each of
        ``receivers``; False (and nothing recorded) if the job is no longer running,
        e.g. failed at its deadline, or (with ``node``) if another node took it over."""
        with self._transaction() as db:
            if not self._set_job_state(
                db,
                job_id,
                (JobState.RUNNING,),
                JobState.DONE,
                assignments="error = NULL, updated_at = ?, timings = ?",
                parameters=(now, json.dumps(timings_s or {})),
                holder=node,
            ):
                return False
            db.executemany(
                "INSERT INTO results (sop_instance_uid, job_id, kind, path, created_at, priority)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (sop_instance_uid) DO UPDATE SET"
                " job_id = excluded.job_id, kind = excluded.kind, path = excluded.path,"
                " created_at = excluded.created_at, priority = excluded.priority,"
                " planned_at = NULL, kept_reason = NULL",
                [
                    (
                        r.sop_instance_uid,
                        job_id,
                        r.kind.value,
                        str(r.path),
                        now,
                        PRIORITY_RANK[r.priority],
                    )
                    for r in results
                ],
            )
            add_notifications(db, job_id, critical, receivers, now)
            return True

    def retry_failed_job(self, job_id: str, now: float) -> None:
        """An operator's retry: a failed or dead job back in the queue as if new (its
        attempts and interruptions forgotten), in one transaction.

        Raises :class:`NotFoundError`, or :class:`RefusedError` when the job is not
        failed nor dead (a done job's results are re-sent by replaying its delivery),
        or when its series' instances are no longer on disk (retention removed them).
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT state, series_uid FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id} in the state store")
            state, series_uid = JobState(row[0]), row[1]
            if state not in (JobState.FAILED, JobState.DEAD):
                raise RefusedError(
                    f"job {job_id} is {state.value}: only a failed or dead job is retried"
                )
            paths = [
                Path(p)
                for (p,) in db.execute(
                    "SELECT path FROM instances WHERE series_uid = ?", (series_uid,)
                )
            ]
            if not paths or not all(path.exists() for path in paths):
                raise RefusedError(
                    f"job {job_id} cannot run again: its series' instances are no longer"
                    " on disk (retention removed them); send the series again"
                )
            self._set_job_state(
                db,
                job_id,
                (state,),
                JobState.QUEUED,
                assignments="attempts = 0, interruptions = 0, error = NULL, not_before = NULL,"
                " started_at = NULL, timings = NULL, updated_at = ?",
                parameters=(now,),
            )

    def requeue_jobs(self, job_ids: list[str], now: float, node: str | None = None) -> None:
        """Running → queued at an orderly stop, not counted as an interruption (those
        ``node`` still holds, with it)."""
        with self._transaction() as db:
            for job_id in job_ids:
                self._set_job_state(
                    db,
                    job_id,
                    (JobState.RUNNING,),
                    JobState.QUEUED,
                    assignments="updated_at = ?",
                    parameters=(now,),
                    holder=node,
                )

    def superseded_job(self, job_id: str) -> str | None:
        """The done job of the same series and plugin in the latest earlier generation:
        the one whose results this job's supersede."""
        rows = self._rows(
            "SELECT p.job_id FROM jobs j JOIN jobs p ON p.series_uid = j.series_uid"
            " AND p.kind = j.kind AND p.plugin = j.plugin AND p.generation < j.generation"
            " WHERE j.job_id = ? AND p.state = ? ORDER BY p.generation DESC LIMIT 1",
            (job_id, JobState.DONE.value),
        )
        return str(rows[0][0]) if rows else None

    def job(self, job_id: str) -> JobRow:
        rows = self._jobs_where("job_id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id} in the state store")
        return rows[0]

    def jobs(self) -> list[JobRow]:
        return self._jobs_where("1 = 1", ())

    def _jobs_where(self, condition: str, parameters: tuple[Any, ...]) -> list[JobRow]:
        rows = self._rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE {condition}"  # noqa: S608 - constant
            " ORDER BY created_at",
            parameters,
        )
        return [_job(row) for row in rows]


def _record_instance(
    db: Connection, rec: InstanceRecord, replace_changed: bool, at: float
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
        INSERT INTO series VALUES (?, ?, ?, ?, ?, ?, ?, 1, ?, 0, NULL)
        ON CONFLICT (series_uid) DO UPDATE SET
            last_received_at = excluded.last_received_at,
            instance_count = series.instance_count + 1,
            generation = series.generation + CASE WHEN series.state = ? THEN 1 ELSE 0 END,
            first_received_at = CASE WHEN series.state = ?
                THEN excluded.first_received_at ELSE series.first_received_at END,
            state = excluded.state
        """,
        (
            rec.series_uid,
            rec.study_uid,
            rec.modality,
            rec.calling_ae,
            rec.called_ae,
            at,
            at,
            SeriesState.RECEIVING.value,
            SeriesState.COMPLETE.value,
            SeriesState.COMPLETE.value,
        ),
    )
    if known is not None:
        return ArrivalOutcome(Arrival.CHANGED_REPLACED, superseded_path=Path(known[1]))
    return ArrivalOutcome(Arrival.NEW)


_JOB_COLUMNS = (
    "job_id, series_uid, study_uid, kind, plugin, state, attempts, error, priority,"
    " interruptions, started_at"
)


def _job(row: tuple[Any, ...]) -> JobRow:
    job_id, series_uid, study_uid, kind, plugin, state, attempts, error, rank, cut, at = row
    return JobRow(
        job_id,
        series_uid,
        study_uid,
        JobKind(kind),
        plugin,
        JobState(state),
        attempts,
        error,
        PRIORITY_OF_RANK[rank],
        cut,
        at,
    )
