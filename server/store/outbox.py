"""The outbox in the state store: result objects, and their deliveries to destinations.

A job's results are written and committed with the job (``Store.finish_job``); the
outbox then plans each into the one open delivery of its study and destination (or
keeps it on disk when there is no destination). A delivery is sent in one
association; each object keeps its own outcome there, so an object the destination
accepted is not sent again, and one it refused for good does not hold up the others.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from infergate.config import Destination
from infergate.errors import NotFoundError, RefusedError, StoreError
from infergate.store.connection import Connection
from infergate.store.db import Database, set_state
from infergate.store.rows import (
    DeliveryItem,
    DeliveryRow,
    ResultRow,
    UnplannedResult,
)
from infergate.work.states import (
    PRIORITY_OF_RANK,
    PRIORITY_RANK,
    DeliveryState,
    JobKind,
    JobState,
    Priority,
    ResultKind,
    ResultState,
    allowed,
)

_DELIVERY_COLUMNS = (
    "delivery_id, study_uid, destination_ae, destination_host, destination_port, calling_ae,"
    " state, priority, attempts, created_at, first_attempt_at, next_attempt_at, outcome, reason"
)
_OPEN = (DeliveryState.PENDING.value, DeliveryState.RETRY_WAIT.value)


class Planned(Protocol):
    """What planning needs of an object: a result, or an item handed over."""

    @property
    def sop_instance_uid(self) -> str: ...

    @property
    def priority(self) -> Priority: ...


class OutboxRecords(Database):
    # -- planning ---------------------------------------------------------------

    def unplanned_results(self) -> list[UnplannedResult]:
        """Results not yet in a delivery (nor kept), urgent ones first, with who sent
        their series and from where (the address of its first instance's association)."""
        rows = self._rows(
            "SELECT r.sop_instance_uid, r.job_id, r.kind, r.path, r.priority, j.study_uid,"
            " s.called_ae, j.kind, s.calling_ae, (SELECT a.peer_address FROM instances i"
            " JOIN associations a ON a.association_id = i.association_id"
            " WHERE i.series_uid = s.series_uid ORDER BY i.received_at LIMIT 1)"
            " FROM results r JOIN jobs j ON j.job_id = r.job_id"
            " JOIN series s ON s.series_uid = j.series_uid"
            " WHERE r.planned_at IS NULL ORDER BY r.priority, r.created_at, r.kind"
        )
        return [_unplanned(row) for row in rows]

    def plan_delivery(
        self,
        study_uid: str,
        destination: Destination,
        calling_ae: str,
        results: Sequence[Planned],
        now: float,
    ) -> str:
        """Put ``results`` into the open delivery of ``study_uid`` to ``destination``
        (creating it, due now), in one transaction; returns its id."""
        key = (study_uid, destination.ae_title, destination.host, destination.port, calling_ae)
        rank = min(PRIORITY_RANK[r.priority] for r in results)
        uids = [r.sop_instance_uid for r in results]
        with self._transaction() as db:
            delivery_id = _add_to_open_delivery(db, key, rank, uids, now)
            _mark_planned(db, uids, now, None)
        return delivery_id

    def replay_delivery(self, delivery_id: str, destination: Destination | None, now: float) -> str:
        """An operator's replay of a dead letter: its objects not yet delivered go into
        the open delivery of its study to ``destination`` (its own, when None), due
        now, in one transaction; returns that delivery's id.

        The dead delivery stays as the record of what happened, marked with the one
        that carries its objects now, and is no longer counted as a dead letter.
        Raises :class:`NotFoundError`, or :class:`RefusedError` when it is not a dead
        letter (delivered, on its way, or replayed already).
        """
        with self._transaction() as db:
            row = db.execute(
                "SELECT study_uid, destination_ae, destination_host, destination_port,"
                " calling_ae, state, priority, replayed_to FROM deliveries"
                " WHERE delivery_id = ?",
                (delivery_id,),
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no delivery {delivery_id} in the state store")
            study_uid, ae_title, host, port, calling_ae, state, rank, replayed_to = row
            if replayed_to is not None:
                raise RefusedError(f"delivery {delivery_id} was replayed already, as {replayed_to}")
            if state != DeliveryState.DEAD.value:
                raise RefusedError(
                    f"delivery {delivery_id} is {state}, not a dead letter: nothing to replay"
                )
            uids = [
                str(uid)
                for (uid,) in db.execute(
                    "SELECT sop_instance_uid FROM delivery_items"
                    " WHERE delivery_id = ? AND state != ?",
                    (delivery_id, ResultState.DELIVERED.value),
                )
            ]
            if not uids:
                raise RefusedError(f"delivery {delivery_id} has no object left to send")
            target = (ae_title, host, port) if destination is None else destination.key
            replay_id = _add_to_open_delivery(db, (study_uid, *target, calling_ae), rank, uids, now)
            db.execute(
                "UPDATE deliveries SET replayed_to = ?, updated_at = ? WHERE delivery_id = ?",
                (replay_id, now, delivery_id),
            )
        return replay_id

    def send_job_results(
        self, job_id: str, destination: Destination, calling_ae: str, now: float
    ) -> str:
        """Every result of a done job into the open delivery of its study to
        ``destination`` (those kept on disk, or delivered elsewhere already), due now;
        returns its id. Raises :class:`NotFoundError`, or :class:`RefusedError` when
        the job is not done or made no result."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT state, study_uid FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
            if row is None:
                raise NotFoundError(f"no job {job_id} in the state store")
            if row[0] != JobState.DONE.value:
                raise RefusedError(f"job {job_id} is {row[0]}, not done: it has no results")
            results = db.execute(
                "SELECT sop_instance_uid, priority FROM results WHERE job_id = ?", (job_id,)
            ).fetchall()
            if not results:
                raise RefusedError(f"job {job_id} made no result objects")
            key = (row[1], *destination.key, calling_ae)
            rank = min(rank for _, rank in results)
            return _add_to_open_delivery(db, key, rank, [uid for uid, _ in results], now)

    def replace_with_captures(
        self,
        delivery_id: str,
        replaced: str,
        reason: str,
        captures: Sequence[ResultRow],
        now: float,
    ) -> None:
        """A SEG its destination does not store (``replaced``) gives way, in its
        delivery, to the Secondary Capture images drawn from it, in one transaction:
        they become results of its job, pending in the delivery; it is marked replaced,
        with ``reason``. Done again (after a crash), it changes nothing more."""
        with self._transaction() as db:
            db.executemany(
                "INSERT INTO results (sop_instance_uid, job_id, kind, path,"
                " created_at, priority, planned_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO NOTHING",
                [
                    (
                        r.sop_instance_uid,
                        r.job_id,
                        r.kind.value,
                        str(r.path),
                        now,
                        PRIORITY_RANK[r.priority],
                        now,
                    )
                    for r in captures
                ],
            )
            db.executemany(
                "INSERT INTO delivery_items (delivery_id, sop_instance_uid, state)"
                " VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [(delivery_id, r.sop_instance_uid, ResultState.PENDING.value) for r in captures],
            )
            if not allowed(ResultState.PENDING, ResultState.REPLACED):
                raise StoreError("delivery_items: pending -> replaced is not a transition")
            db.execute(
                "UPDATE delivery_items SET state = ?, reason = ?"
                " WHERE delivery_id = ? AND sop_instance_uid = ? AND state = ?",
                (
                    ResultState.REPLACED.value,
                    reason,
                    delivery_id,
                    replaced,
                    ResultState.PENDING.value,
                ),
            )

    def result_sources(self, sop_instance_uid: str) -> tuple[str, list[Path]]:
        """The job a result belongs to and the spooled instances of its series."""
        rows = self._rows(
            "SELECT r.job_id, i.path FROM results r JOIN jobs j ON j.job_id = r.job_id"
            " JOIN instances i ON i.series_uid = j.series_uid"
            " WHERE r.sop_instance_uid = ?",
            (sop_instance_uid,),
        )
        if not rows:
            raise NotFoundError(f"no source instances on record for result {sop_instance_uid}")
        return str(rows[0][0]), [Path(path) for _, path in rows]

    def keep_results(self, uids: list[str], reason: str, now: float) -> None:
        """No destination for these: they stay on disk, and the reason is recorded."""
        with self._transaction() as db:
            _mark_planned(db, uids, now, reason)

    # -- sending ----------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DeliveryRow]:
        """Deliveries to attempt now: urgent ones first, then the longest waiting."""
        rows = self._rows(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries"  # noqa: S608 - constant
            " WHERE state IN (?, ?) AND next_attempt_at <= ?"
            " ORDER BY priority, next_attempt_at, created_at",
            (*_OPEN, now),
        )
        return [_delivery(row) for row in rows]

    def claim_delivery(self, delivery_id: str, now: float, node: str | None = None) -> bool:
        """Pending or waiting → sending by ``node``, counting the attempt; False if
        another worker took it or it is no longer open."""
        with self._transaction() as db:
            return _set_delivery_state(
                db,
                delivery_id,
                (DeliveryState.PENDING, DeliveryState.RETRY_WAIT),
                DeliveryState.SENDING,
                assignments="attempts = attempts + 1, updated_at = ?,"
                " first_attempt_at = COALESCE(first_attempt_at, ?), node = ?",
                parameters=(now, now, node),
            )

    def delivery_items(
        self, delivery_id: str, state: ResultState | None = None
    ) -> list[DeliveryItem]:
        """The objects of a delivery (those in ``state`` only, if given), urgent first."""
        condition = "" if state is None else " AND d.state = ?"
        rows = self._rows(
            "SELECT d.sop_instance_uid, r.kind, r.path, r.priority, d.state, d.status, d.reason"  # noqa: S608 - constant
            " FROM delivery_items d JOIN results r ON r.sop_instance_uid = d.sop_instance_uid"
            f" WHERE d.delivery_id = ?{condition} ORDER BY r.priority, r.created_at, r.kind",
            (delivery_id,) if state is None else (delivery_id, state.value),
        )
        return [
            DeliveryItem(
                uid,
                ResultKind(kind),
                Path(path),
                PRIORITY_OF_RANK[rank],
                ResultState(item_state),
                status,
                reason,
            )
            for uid, kind, path, rank, item_state, status, reason in rows
        ]

    def record_attempt(
        self,
        delivery_id: str,
        items: list[DeliveryItem],
        *,
        state: DeliveryState,
        outcome: str,
        reason: str | None,
        next_attempt_at: float,
        now: float,
        node: str | None = None,
    ) -> None:
        """The outcome of one association: each object's own, then the delivery's new
        state, in one transaction; with ``node``, only while that node holds it (raises
        :class:`StoreError`, recording nothing, once another took it over)."""
        with self._transaction() as db:
            db.executemany(
                "UPDATE delivery_items SET state = ?, status = ?, reason = ?"
                " WHERE delivery_id = ? AND sop_instance_uid = ? AND state = ?",
                [
                    (
                        item.state.value,
                        item.status,
                        item.reason,
                        delivery_id,
                        item.sop_instance_uid,
                        ResultState.PENDING.value,
                    )
                    for item in items
                ],
            )
            finished = state in (DeliveryState.DELIVERED, DeliveryState.DEAD)
            if not _set_delivery_state(
                db,
                delivery_id,
                (DeliveryState.SENDING,),
                state,
                assignments="outcome = ?, reason = ?, next_attempt_at = ?, updated_at = ?,"
                " finished_at = ?",
                parameters=(outcome, reason, next_attempt_at, now, now if finished else None),
                holder=node,
            ):
                raise StoreError(
                    f"delivery {delivery_id} was not being sent"
                    + ("" if node is None else f" by node {node}")
                )

    # -- reading ----------------------------------------------------------------

    def delivery(self, delivery_id: str) -> DeliveryRow:
        rows = self._deliveries_where("delivery_id = ?", (delivery_id,))
        if not rows:
            raise NotFoundError(f"no delivery {delivery_id} in the state store")
        return rows[0]

    def deliveries(self, state: DeliveryState | None = None) -> list[DeliveryRow]:
        if state is None:
            return self._deliveries_where("1 = 1", ())
        return self._deliveries_where("state = ?", (state.value,))

    def results(self) -> list[ResultRow]:
        rows = self._rows(
            "SELECT sop_instance_uid, job_id, kind, path, priority FROM results"
            " ORDER BY created_at, kind"
        )
        return [
            ResultRow(uid, job_id, ResultKind(kind), Path(path), PRIORITY_OF_RANK[rank])
            for uid, job_id, kind, path, rank in rows
        ]

    def result_states(
        self, *, job_id: str | None = None, study_uid: str | None = None
    ) -> dict[str, ResultState]:
        """Each result's state (of one job's, or one study's, if given): its latest
        delivery item's, kept when it has no destination, pending until planned."""
        condition, parameters = "1 = 1", tuple[str, ...]()
        if job_id is not None:
            condition, parameters = "r.job_id = ?", (job_id,)
        elif study_uid is not None:
            condition = "r.job_id IN (SELECT job_id FROM jobs WHERE study_uid = ?)"
            parameters = (study_uid,)
        rows = self._rows(
            "SELECT r.sop_instance_uid, r.planned_at, r.kept_reason, (SELECT d.state FROM"  # noqa: S608 - constant
            " delivery_items d JOIN deliveries v ON v.delivery_id = d.delivery_id"
            " WHERE d.sop_instance_uid = r.sop_instance_uid ORDER BY v.created_at DESC LIMIT 1)"
            f" FROM results r WHERE {condition}",
            parameters,
        )
        states: dict[str, ResultState] = {}
        for uid, planned_at, kept_reason, item_state in rows:
            if item_state is not None:
                states[uid] = ResultState(item_state)
            elif planned_at is not None and kept_reason is not None:
                states[uid] = ResultState.KEPT
            else:
                states[uid] = ResultState.PENDING
        return states

    def _deliveries_where(self, condition: str, parameters: tuple[Any, ...]) -> list[DeliveryRow]:
        rows = self._rows(
            f"SELECT {_DELIVERY_COLUMNS} FROM deliveries WHERE {condition}"  # noqa: S608
            " ORDER BY created_at",
            parameters,
        )
        return [_delivery(row) for row in rows]


def _unplanned(row: tuple[Any, ...]) -> UnplannedResult:
    uid, job_id, kind, path, rank, study_uid, called_ae, job_kind, calling_ae, sender = row
    result = ResultRow(uid, job_id, ResultKind(kind), Path(path), PRIORITY_OF_RANK[rank])
    return UnplannedResult(result, study_uid, called_ae, JobKind(job_kind), calling_ae, sender)


def _add_to_open_delivery(
    db: Connection,
    key: tuple[str, str, str, int, str],
    rank: int,
    uids: list[str],
    now: float,
) -> str:
    """Put the objects ``uids`` into the open delivery of ``key`` (study, destination
    AE title, host, port, calling AE title), creating it due now; returns its id."""
    row = db.execute(
        "SELECT delivery_id FROM deliveries WHERE study_uid = ? AND destination_ae = ?"
        " AND destination_host = ? AND destination_port = ? AND calling_ae = ?"
        " AND state IN (?, ?)",
        (*key, *_OPEN),
    ).fetchone()
    if row is None:
        delivery_id = uuid.uuid4().hex
        db.execute(
            "INSERT INTO deliveries (delivery_id, study_uid, destination_ae,"
            " destination_host, destination_port, calling_ae, state, priority,"
            " created_at, updated_at, next_attempt_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (delivery_id, *key, DeliveryState.PENDING.value, rank, now, now, now),
        )
    else:
        delivery_id = str(row[0])
        db.execute(
            "UPDATE deliveries SET priority = CASE WHEN priority < ? THEN priority ELSE ? END,"
            " updated_at = ? WHERE delivery_id = ?",
            (rank, rank, now, delivery_id),
        )
    db.executemany(
        "INSERT INTO delivery_items (delivery_id, sop_instance_uid, state) VALUES (?, ?, ?)"
        " ON CONFLICT (delivery_id, sop_instance_uid) DO UPDATE SET"
        " state = excluded.state, status = NULL, reason = NULL",
        [(delivery_id, uid, ResultState.PENDING.value) for uid in uids],
    )
    return delivery_id


def _mark_planned(db: Connection, uids: list[str], now: float, kept: str | None) -> None:
    db.executemany(
        "UPDATE results SET planned_at = ?, kept_reason = ? WHERE sop_instance_uid = ?",
        [(now, kept, uid) for uid in uids],
    )


def _set_delivery_state(
    db: Connection,
    delivery_id: str,
    old: tuple[DeliveryState, ...],
    new: DeliveryState,
    *,
    assignments: str,
    parameters: tuple[Any, ...],
    holder: str | None = None,
) -> bool:
    changed = set_state(
        db,
        "deliveries",
        ("delivery_id", delivery_id),
        old,
        new,
        assignments=assignments,
        parameters=parameters,
        holder=holder,
    )
    return changed == 1


def _delivery(row: tuple[Any, ...]) -> DeliveryRow:
    delivery_id, study_uid, ae_title, host, port, calling_ae, state, rank, *rest = row
    attempts, created_at, first_attempt_at, next_attempt_at, outcome, reason = rest
    return DeliveryRow(
        delivery_id,
        study_uid,
        Destination(ae_title=ae_title, host=host, port=port),
        calling_ae,
        DeliveryState(state),
        PRIORITY_OF_RANK[rank],
        attempts,
        created_at,
        first_attempt_at,
        next_attempt_at,
        outcome,
        reason,
    )
