"""The notifications outbox: critical findings on their way to people.

A job's notifications are committed with the job (``Store.finish_job``), one per
critical finding and receiver, their ids derived from both, so a job run again after a
crash adds none. The notify loop claims each when due, sends it, and records what
the receiver answered: delivered, a retry after a backoff, or dead.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from infergate.codes import Code
from infergate.errors import NotFoundError, RefusedError, StoreError
from infergate.store.connection import Connection
from infergate.store.db import Database, set_state
from infergate.store.rows import CriticalFinding, NotificationRow, NotificationView
from infergate.work.states import NotificationState

_COLUMNS = (
    "n.notification_id, n.job_id, n.receiver, n.finding, r.path, n.state, n.attempts,"
    " n.first_attempt_at, n.reason"
)


def notification_id(job_id: str, receiver: str, index: int) -> str:
    """The same finding of the same job to the same receiver: the same id."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"infergate:{job_id}:{receiver}:{index}"))


def _finding_json(finding: CriticalFinding) -> str:
    return json.dumps(
        {
            "name": [finding.name.value, finding.name.scheme, finding.name.meaning],
            "value": [finding.value.value, finding.value.scheme, finding.value.meaning],
            "segment_number": finding.segment_number,
            "plugin": finding.plugin,
            "plugin_version": finding.plugin_version,
            "title": finding.title,
            "report_uid": finding.report_uid,
        }
    )


def _finding(text: str) -> CriticalFinding:
    data = json.loads(text)
    return CriticalFinding(
        name=Code(*data["name"]),
        value=Code(*data["value"]),
        segment_number=data["segment_number"],
        plugin=data["plugin"],
        plugin_version=data["plugin_version"],
        title=data["title"],
        report_uid=data["report_uid"],
    )


def add_notifications(
    db: Connection,
    job_id: str,
    findings: tuple[CriticalFinding, ...],
    receivers: tuple[str, ...],
    now: float,
) -> None:
    """Inside the transaction that finishes the job: a pending notification per
    finding and receiver, unless it is there already."""
    db.executemany(
        "INSERT INTO notifications (notification_id, job_id, receiver, finding,"
        " report_uid, state, created_at, updated_at, next_attempt_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        [
            (
                notification_id(job_id, receiver, index),
                job_id,
                receiver,
                _finding_json(finding),
                finding.report_uid,
                NotificationState.PENDING.value,
                now,
                now,
                now,
            )
            for index, finding in enumerate(findings)
            for receiver in receivers
        ],
    )


class NotificationRecords(Database):
    def due_notifications(self, now: float) -> list[NotificationRow]:
        return self._notifications(
            "n.state IN (?, ?) AND n.next_attempt_at <= ? ORDER BY n.created_at",
            (NotificationState.PENDING.value, NotificationState.RETRY_WAIT.value, now),
        )

    def notifications(self) -> list[NotificationRow]:
        return self._notifications("1 = 1 ORDER BY n.created_at", ())

    def _notifications(self, condition: str, parameters: tuple[Any, ...]) -> list[NotificationRow]:
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM notifications n"  # noqa: S608 - constant fragments
            f" JOIN results r ON r.sop_instance_uid = n.report_uid WHERE {condition}",
            parameters,
        )
        return [
            NotificationRow(
                notification_id=row[0],
                job_id=row[1],
                receiver=row[2],
                finding=_finding(row[3]),
                report_path=Path(row[4]),
                state=NotificationState(row[5]),
                attempts=int(row[6]),
                first_attempt_at=row[7],
                reason=row[8],
            )
            for row in rows
        ]

    def claim_notification(self, notification_id: str, now: float, node: str | None = None) -> bool:
        """Mark it being sent by ``node`` (counting the attempt); False when another
        claimed it."""
        with self._transaction() as db:
            return bool(
                set_state(
                    db,
                    "notifications",
                    ("notification_id", notification_id),
                    (NotificationState.PENDING, NotificationState.RETRY_WAIT),
                    NotificationState.SENDING,
                    assignments="attempts = attempts + 1, updated_at = ?,"
                    " first_attempt_at = COALESCE(first_attempt_at, ?), node = ?",
                    parameters=(now, now, node),
                )
            )

    def record_notification(
        self,
        notification_id: str,
        state: NotificationState,
        reason: str | None,
        next_attempt_at: float,
        now: float,
        *,
        node: str | None = None,
    ) -> None:
        """An attempt's outcome; with ``node``, only while that node holds it."""
        with self._transaction() as db:
            if not set_state(
                db,
                "notifications",
                ("notification_id", notification_id),
                (NotificationState.SENDING,),
                state,
                assignments="reason = ?, next_attempt_at = ?, updated_at = ?",
                parameters=(reason, next_attempt_at, now),
                holder=node,
            ):
                raise StoreError(
                    f"notification {notification_id} was not being sent"
                    + ("" if node is None else f" by node {node}")
                )

    def notification_views(self, *, dead_only: bool, limit: int) -> list[NotificationView]:
        """Notifications newest first (dead letters only, if asked), as operators see
        them: the finding in words, never the report's patient data."""
        condition = "n.state = ?" if dead_only else "1 = 1"
        parameters: tuple[Any, ...] = (NotificationState.DEAD.value,) if dead_only else ()
        rows = self._rows(
            "SELECT n.notification_id, n.job_id, n.receiver, n.finding, n.state, n.attempts,"  # noqa: S608 - constant fragments
            f" n.created_at, n.updated_at, n.reason FROM notifications n WHERE {condition}"
            " ORDER BY n.created_at DESC LIMIT ?",
            (*parameters, limit),
        )
        views = []
        for nid, job_id, receiver, finding, state, attempts, created, updated, reason in rows:
            found = _finding(finding)
            views.append(
                NotificationView(
                    notification_id=nid,
                    job_id=job_id,
                    receiver=receiver,
                    finding=f"{found.name.meaning}: {found.value.meaning}",
                    plugin=found.plugin,
                    report_uid=found.report_uid,
                    state=state,
                    attempts=int(attempts),
                    created_at=float(created),
                    updated_at=float(updated),
                    reason=reason,
                )
            )
        return views

    def resend_notification(self, notification_id: str, now: float) -> None:
        """An operator's resend of a dead notification: due now, with the same id (its
        receiver can tell it from one it got). Raises :class:`NotFoundError`, or
        :class:`RefusedError` when it is not dead (delivered, or on its way)."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT state FROM notifications WHERE notification_id = ?", (notification_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no notification {notification_id} in the state store")
            if row[0] != NotificationState.DEAD.value:
                raise RefusedError(f"notification {notification_id} is {row[0]}, not a dead letter")
            set_state(
                db,
                "notifications",
                ("notification_id", notification_id),
                (NotificationState.DEAD,),
                NotificationState.PENDING,
                assignments="attempts = 0, first_attempt_at = NULL, next_attempt_at = ?,"
                " updated_at = ?",
                parameters=(now, now),
            )
