"""The association audit trail, which is also the count of associations open now.

Every association that sent a request has a row: accepted ones from the moment they
are admitted until they end, rejected ones with the reason. Rows with no end are the
associations open now, in every listener process, which is what the limits count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Protocol, TypeVar

from infergate.store.connection import Connection
from infergate.store.db import Database
from infergate.store.rows import AssociationAudit

_COLUMNS = (
    "association_id, peer_address, peer_port, calling_ae, called_ae, tls, outcome, reason,"
    " started_at, ended_at, instances, bytes, failures, process_id, node"
)
# An audit row written again (its end, its counts) replaces the one before.
_REPLACING = "ON CONFLICT (association_id) DO UPDATE SET " + ", ".join(
    f"{column} = excluded.{column}" for column in _COLUMNS.replace(" ", "").split(",")[1:]
)


class Verdict(Protocol):
    """A refusal: admission returns one with its reason, or None to admit."""

    @property
    def reason(self) -> str: ...


V = TypeVar("V", bound=Verdict)


class AssociationRecords(Database):
    def admit(
        self, audit: AssociationAudit, judge: Callable[[int, int], V | None], now: float
    ) -> V | None:
        """Record ``audit`` as accepted, or as rejected if ``judge`` refuses it.

        ``judge(open_associations, open_from_its_address)`` sees the associations open
        now in every process of the audit's node (the limits are a node's), and decides
        in the same transaction that records its verdict, so two listener processes
        cannot both take the last slot.
        """
        with self._transaction() as db:
            total, same_address = db.execute(
                "SELECT COUNT(*), COUNT(CASE WHEN peer_address = ? THEN 1 END) FROM associations"
                " WHERE ended_at IS NULL AND node = ?",
                (audit.peer_address, audit.node),
            ).fetchone()
            verdict = judge(total, same_address)
            if verdict is not None:
                audit = replace(audit, outcome="rejected", reason=verdict.reason, ended_at=now)
            _insert(db, audit)
        return verdict

    def record_association(self, audit: AssociationAudit, ended_at: float) -> None:
        """Record an association that ended before admission (a refused TLS handshake)."""
        with self._transaction() as db:
            _insert(db, replace(audit, ended_at=ended_at))

    def close_association(
        self,
        association_id: str,
        outcome: str,
        *,
        instances: int,
        size: int,
        failures: int,
        now: float,
        reason: str | None = None,
    ) -> None:
        """End an association. A release (not an abort) is also a hint for assembly: the
        series it sent may be complete (``assembly.release_quiet_period_s``)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE associations SET outcome = ?, instances = ?, bytes = ?, failures = ?,"
                " ended_at = ?, reason = COALESCE(?, reason) WHERE association_id = ?",
                (outcome, instances, size, failures, now, reason, association_id),
            )
            if outcome == "released" and instances:
                db.execute(
                    "UPDATE series SET released_at = ? WHERE state = 'receiving' AND series_uid"
                    " IN (SELECT series_uid FROM instances WHERE association_id = ?)",
                    (now, association_id),
                )

    def abandon_open_associations(self, reason: str, now: float, node: str, process_id: int) -> int:
        """End the associations a dead listener process of ``node`` left open;
        returns how many. Their instance and byte counts, kept by the dead process
        until the end, are lost; the instances table still has every instance."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE associations SET outcome = 'aborted', reason = ?, ended_at = ?"
                " WHERE ended_at IS NULL AND node = ? AND process_id = ?",
                (reason, now, node, process_id),
            )
            return cur.rowcount

    def associations(self) -> list[AssociationAudit]:
        rows = self._rows(
            f"SELECT {_COLUMNS} FROM associations ORDER BY started_at"  # noqa: S608 - constant
        )
        return [AssociationAudit(r[0], r[1], r[2], r[3], r[4], bool(r[5]), *r[6:]) for r in rows]


def _insert(db: Connection, audit: AssociationAudit) -> None:
    db.execute(
        f"INSERT INTO associations ({_COLUMNS})"  # noqa: S608 - constant columns
        f" VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) {_REPLACING}",
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
            audit.process_id,
            audit.node,
        ),
    )
