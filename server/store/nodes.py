"""Gateway nodes in the state store: each beats while it lives, and what a dead one
held is taken back.

A node holds work when it claims it: a job it started (``jobs.node``), a delivery or a
notification it is sending (``deliveries.node``, ``notifications.node``), an
association open on one of its listeners (``associations.node``). Its lease on all of
it is its beat (``nodes.heartbeat_at``), renewed every third of ``work.lease_s``. At
its start a node takes back what it held before it stopped (``recover``); while it
runs it takes over what a node whose beat is older than the lease held
(``take_over``): the jobs go back in the queue (an interruption counted, a dead
letter at ``work.max_interruptions``), the deliveries and notifications are due
again, the associations are ended. Each is one write transaction, so two nodes never
take the same work, and a node that was only slow finds, when it comes back, that
what it would record is no longer its own (``holder`` in the jobs' and deliveries'
transitions).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from infergate.errors import NotFoundError, RefusedError
from infergate.store.connection import Connection
from infergate.store.db import Database, held_by_condition, set_state
from infergate.work.states import DeliveryState, JobState, NotificationState, SeriesState


@dataclass(frozen=True)
class NodeRow:
    node: str
    started_at: float
    heartbeat_at: float
    version: str


@dataclass(frozen=True)
class NodeView:
    node: str
    version: str
    started_at: float
    heartbeat_at: float
    alive: bool  # it beat within work.lease_s
    running_jobs: int
    sending_deliveries: int


@dataclass(frozen=True)
class Recovered:
    """What was taken back from the nodes named (all of them, at a lone node's start)."""

    nodes: tuple[str, ...] = ()
    requeued: list[str] = field(default_factory=list)  # job ids
    dead: list[str] = field(default_factory=list)  # job ids, dead letters now
    deliveries: int = 0
    notifications: int = 0
    associations: int = 0

    def __bool__(self) -> bool:
        return bool(
            self.requeued or self.dead or self.deliveries or self.notifications or self.associations
        )


class NodeRecords(Database):
    def beat(self, node: str, now: float, *, version: str, started_at: float | None = None) -> None:
        """``node`` is alive at ``now``; ``started_at`` at its start (its row is made
        at its first beat)."""
        restarted = "" if started_at is None else " started_at = excluded.started_at,"
        with self._transaction() as db:
            db.execute(
                "INSERT INTO nodes (node, started_at, heartbeat_at, version) VALUES (?, ?, ?, ?)"  # noqa: S608 - constant fragments
                f" ON CONFLICT (node) DO UPDATE SET{restarted}"
                " heartbeat_at = excluded.heartbeat_at, version = excluded.version",
                (node, now if started_at is None else started_at, now, version),
            )

    def leave(self, node: str) -> None:
        """An orderly stop: ``node`` is no longer one of the nodes, and what it still
        holds is for the others to take at once."""
        with self._transaction() as db:
            db.execute("DELETE FROM nodes WHERE node = ?", (node,))

    def forget(self, node: str, now: float, lease_s: float) -> None:
        """An operator's word that a gone node is not coming back: its row goes.

        Raises :class:`NotFoundError`, or :class:`RefusedError` while it beats, or
        while it still holds work (before another node took it over)."""
        with self._transaction() as db:
            row = db.execute("SELECT heartbeat_at FROM nodes WHERE node = ?", (node,)).fetchone()
            if row is None:
                raise NotFoundError(f"no node {node} in the state store")
            if row[0] >= now - lease_s:
                raise RefusedError(f"node {node} is alive: it beat within work.lease_s")
            (held,) = db.execute(
                "SELECT (SELECT COUNT(*) FROM jobs WHERE node = :node AND state = :running)"
                " + (SELECT COUNT(*) FROM deliveries WHERE node = :node AND state = :sending)"
                " + (SELECT COUNT(*) FROM notifications WHERE node = :node AND state = :sending)",
                {
                    "node": node,
                    "running": JobState.RUNNING.value,
                    "sending": DeliveryState.SENDING.value,
                },
            ).fetchone()
            if held:
                raise RefusedError(
                    f"node {node} still holds {held} job(s), delivery(ies) or notification(s):"
                    " another node takes them over first"
                )
            db.execute("DELETE FROM nodes WHERE node = ?", (node,))

    def nodes(self) -> list[NodeRow]:
        rows = self._rows("SELECT node, started_at, heartbeat_at, version FROM nodes ORDER BY node")
        return [NodeRow(*row) for row in rows]

    def node_views(self, now: float, lease_s: float) -> list[NodeView]:
        """Every node that beat and did not leave, as operators see it."""
        rows = self._rows(
            "SELECT n.node, n.version, n.started_at, n.heartbeat_at,"
            " (SELECT COUNT(*) FROM jobs j WHERE j.node = n.node AND j.state = ?),"
            " (SELECT COUNT(*) FROM deliveries d WHERE d.node = n.node AND d.state = ?)"
            " FROM nodes n ORDER BY n.node",
            (JobState.RUNNING.value, DeliveryState.SENDING.value),
        )
        return [
            NodeView(node, version, started, beat, beat >= now - lease_s, jobs, sending)
            for node, version, started, beat, jobs, sending in rows
        ]

    def recover(
        self,
        now: float,
        max_interruptions: int,
        *,
        nodes: Sequence[str] | None = None,
        fresh_quiet: bool = True,
    ) -> Recovered:
        """At a node's start, take back what ``nodes`` held (every node's work, when
        None: the only node, on SQLite, which forgets any other name it had).

        ``fresh_quiet``: series still receiving get a fresh quiet period from ``now``,
        for their senders could not reach us while we were down, and completing them
        at once would run a job on part of a series and another when the rest
        arrives (not so when another node was up meanwhile).
        """
        with self._transaction() as db:
            if fresh_quiet:
                db.execute(
                    "UPDATE series SET last_received_at = ?"
                    " WHERE state = ? AND last_received_at < ?",
                    (now, SeriesState.RECEIVING.value, now),
                )
            if nodes is None:
                db.execute("DELETE FROM nodes")  # a host renamed is not a node gone
            return _take_back(db, now, max_interruptions, nodes)

    def take_over(self, me: str, now: float, lease_s: float, max_interruptions: int) -> Recovered:
        """Take back what every node but ``me`` whose beat is older than ``lease_s``
        held (and what no node holds by name: rows from before nodes had names)."""
        with self._transaction() as db:
            alive = {
                row[0]
                for row in db.execute(
                    "SELECT node FROM nodes WHERE heartbeat_at >= ?", (now - lease_s,)
                )
            }
            holders = {
                row[0]
                for row in db.execute(
                    "SELECT COALESCE(node, '') FROM jobs WHERE state = ?"
                    " UNION SELECT COALESCE(node, '') FROM deliveries WHERE state = ?"
                    " UNION SELECT COALESCE(node, '') FROM notifications WHERE state = ?"
                    " UNION SELECT node FROM associations WHERE ended_at IS NULL",
                    (
                        JobState.RUNNING.value,
                        DeliveryState.SENDING.value,
                        NotificationState.SENDING.value,
                    ),
                )
            }
            gone = sorted(holders - alive - {me})
            if not gone:
                return Recovered()
            return _take_back(db, now, max_interruptions, gone)


def _take_back(
    db: Connection, now: float, max_interruptions: int, nodes: Sequence[str] | None
) -> Recovered:
    if nodes is not None and not nodes:
        return Recovered()
    held = "" if nodes is None else f" AND {held_by_condition(nodes)}"
    names = tuple(nodes or ())
    interrupted = db.execute(
        f"SELECT job_id, interruptions FROM jobs WHERE state = ?{held}",  # noqa: S608 - marks only
        (JobState.RUNNING.value, *names),
    ).fetchall()
    requeued, dead = [], []
    for job_id, interruptions in interrupted:
        count = interruptions + 1
        if count >= max_interruptions:
            reason = (
                f"dead letter: its run was interrupted by a process death {count} times"
                " (work.max_interruptions); retry it once the cause is mended"
            )
            new, assignments = JobState.DEAD, "interruptions = ?, error = ?, updated_at = ?"
            parameters: tuple[object, ...] = (count, reason, now)
            dead.append(str(job_id))
        else:
            new, assignments = JobState.QUEUED, "interruptions = ?, updated_at = ?"
            parameters = (count, now)
            requeued.append(str(job_id))
        set_state(
            db,
            "jobs",
            ("job_id", job_id),
            (JobState.RUNNING,),
            new,
            assignments=assignments,
            parameters=parameters,
        )
    deliveries = set_state(
        db,
        "deliveries",
        None,
        (DeliveryState.SENDING,),
        DeliveryState.PENDING,
        assignments="updated_at = ?",
        parameters=(now,),
        held_by=nodes,
    )
    # The receiver may have one already: each message carries the same id, for it to tell.
    notifications = set_state(
        db,
        "notifications",
        None,
        (NotificationState.SENDING,),
        NotificationState.PENDING,
        assignments="next_attempt_at = ?, updated_at = ?",
        parameters=(now, now),
        held_by=nodes,
    )
    # Their instance and byte counts, kept by the dead process until the end, are lost;
    # the instances table has every instance.
    associations = db.execute(
        "UPDATE associations SET outcome = 'aborted', reason = ?, ended_at = ?"  # noqa: S608 - marks only
        f" WHERE ended_at IS NULL{held}",
        ("Infergate stopped during the association", now, *names),
    ).rowcount
    return Recovered(names, requeued, dead, deliveries, notifications, associations)
