"""Nodes sharing a state store: what a node holds is taken over once its beat is older
than the lease, only then, by one node, and what the node gone would record after
that is refused. On both backends (two Store objects stand for two nodes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infergate.codes import HEMORRHAGE, PRESENT
from infergate.config import Settings
from infergate.errors import NotFoundError, RefusedError, StoreError
from infergate.store import (
    AssociationAudit,
    CriticalFinding,
    DeliveryItem,
    InstanceRecord,
    NewJob,
    ResultRow,
    Store,
)
from infergate.work.states import (
    DeliveryState,
    JobKind,
    JobState,
    NotificationState,
    ResultKind,
    ResultState,
)

LEASE = 10.0


def _instance(uid: str) -> InstanceRecord:
    return InstanceRecord(
        uid, "1.2", "series", "study", "CT", Path(f"/spool/{uid}.dcm"), 10, "assoc",
        "SCANNER", "INFERGATE", uid,
    )  # fmt: skip


def _job(store: Store, job_id: str, node: str, at: float) -> None:
    """A job of a series of its own, started by ``node`` at ``at``."""
    store.record_instance(_instance(f"{job_id}.1"), now=at - 5)
    (series,) = store.receiving_series()
    assert store.complete_series(series, [NewJob(job_id, JobKind.INFERENCE, "p")], at - 1)
    assert store.start_job(job_id, at, node)


def _report(tmp_path: Path, job_id: str) -> ResultRow:
    return ResultRow(f"sr-{job_id}", job_id, ResultKind.SR, tmp_path / f"{job_id}.dcm")


def _destination() -> Settings:
    return Settings.model_validate(
        {"export": {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}}
    )


@pytest.fixture
def nodes(database: Path | str) -> tuple[Store, Store]:
    """Nodes ``a`` and ``b``, both beating at 100."""
    a, b = Store(database), Store(database)
    a.beat("a", 100.0, started_at=100.0, version="test")
    b.beat("b", 100.0, started_at=100.0, version="test")
    return a, b


def test_a_running_job_stays_with_its_node_while_it_beats_and_moves_after(
    nodes: tuple[Store, Store], tmp_path: Path
) -> None:
    a, b = nodes
    _job(a, "job1", "a", 101.0)
    a.beat("a", 105.0, version="test")
    assert not b.take_over("b", 114.0, LEASE, 3)  # a beat 9 s ago: still its own
    assert b.job("job1").state is JobState.RUNNING
    taken = b.take_over("b", 116.0, LEASE, 3)
    assert (taken.nodes, taken.requeued, taken.dead) == (("a",), ["job1"], [])
    assert not b.take_over("b", 117.0, LEASE, 3)  # taken once
    job = b.job("job1")
    assert (job.state, job.interruptions) == (JobState.QUEUED, 1)
    # b runs it; a, back from a long pause, cannot record it as its own.
    assert b.start_job("job1", 118.0, "b")
    assert not a.finish_job("job1", [_report(tmp_path, "job1")], 119.0, node="a")
    assert not a.fail_job("job1", "late", 119.0, node="a")
    assert not a.retry_job("job1", "late", 130.0, 119.0, node="a")
    assert b.job("job1").state is JobState.RUNNING
    assert b.finish_job("job1", [_report(tmp_path, "job1")], 120.0, node="b")
    assert [r.sop_instance_uid for r in b.results()] == ["sr-job1"]


def test_a_queued_job_is_failed_by_any_node(nodes: tuple[Store, Store]) -> None:
    a, _ = nodes
    a.record_instance(_instance("q.1"), now=100.0)
    (series,) = a.receiving_series()
    assert a.complete_series(series, [NewJob("queued", JobKind.INFERENCE, "p")], 101.0)
    assert a.fail_job("queued", "too large", 102.0, node="a")  # nobody holds a queued job


def test_a_delivery_and_a_notification_being_sent_are_due_again_after_the_lease(
    nodes: tuple[Store, Store], tmp_path: Path
) -> None:
    a, b = nodes
    _job(a, "job1", "a", 101.0)
    report = _report(tmp_path, "job1")
    finding = CriticalFinding(HEMORRHAGE, PRESENT, None, "p", "1", "P", report.sop_instance_uid)
    assert a.finish_job(
        "job1", [report], 102.0, critical=(finding,), receivers=("pager",), node="a"
    )
    destination = _destination().export.destination
    assert destination is not None
    delivery_id = a.plan_delivery("study", destination, "INFERGATE", [report], 103.0)
    assert a.claim_delivery(delivery_id, 104.0, "a")
    (notification,) = a.due_notifications(104.0)
    assert a.claim_notification(notification.notification_id, 104.0, "a")
    assert b.due_deliveries(200.0) == []
    assert b.due_notifications(200.0) == []
    taken = b.take_over("b", 111.0, LEASE, 3)  # a's beat at 100: gone
    assert (taken.deliveries, taken.notifications, taken.requeued) == (1, 1, [])
    assert [d.delivery_id for d in b.due_deliveries(112.0)] == [delivery_id]
    assert b.claim_delivery(delivery_id, 112.0, "b")
    item = DeliveryItem(
        report.sop_instance_uid, ResultKind.SR, report.path, "normal", ResultState.DELIVERED
    )
    with pytest.raises(StoreError, match="not being sent by node a"):
        a.record_attempt(
            delivery_id, [item], state=DeliveryState.DELIVERED, outcome="delivered",
            reason=None, next_attempt_at=113.0, now=113.0, node="a",
        )  # fmt: skip
    assert b.delivery(delivery_id).state is DeliveryState.SENDING  # a recorded nothing
    assert b.delivery_items(delivery_id)[0].state is ResultState.PENDING
    b.record_attempt(
        delivery_id, [item], state=DeliveryState.DELIVERED, outcome="delivered",
        reason=None, next_attempt_at=114.0, now=114.0, node="b",
    )  # fmt: skip
    assert b.delivery(delivery_id).state is DeliveryState.DELIVERED
    assert b.claim_notification(notification.notification_id, 115.0, "b")
    with pytest.raises(StoreError, match="not being sent by node a"):
        a.record_notification(
            notification.notification_id, NotificationState.DELIVERED, None, 116.0, 116.0, node="a"
        )


def test_a_node_that_left_in_order_is_taken_over_at_once(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    _job(a, "job1", "a", 101.0)
    a.leave("a")
    assert b.take_over("b", 102.0, LEASE, 3).requeued == ["job1"]


def test_a_job_a_node_kept_dying_on_is_a_dead_letter(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    _job(a, "job1", "a", 101.0)
    assert b.take_over("b", 120.0, LEASE, 2).requeued == ["job1"]
    b.beat("b", 121.0, version="test")
    assert b.start_job("job1", 121.0, "b")
    assert a.take_over("a", 140.0, LEASE, 2).dead == ["job1"]  # now b is gone
    assert a.job("job1").state is JobState.DEAD


def test_a_restarted_node_takes_back_only_its_own_work(nodes: tuple[Store, Store]) -> None:
    a, b = nodes
    _job(a, "job-a", "a", 101.0)
    _job(b, "job-b", "b", 102.0)
    b.record_instance(_instance("later.1"), now=103.0)  # a series still receiving
    recovered = a.recover(104.0, 3, nodes=["a"], fresh_quiet=False)
    assert (recovered.requeued, recovered.dead) == (["job-a"], [])
    assert b.job("job-b").state is JobState.RUNNING
    (receiving,) = b.receiving_series()
    assert receiving.last_received_at == 103.0  # b took instances meanwhile


def test_open_associations_are_a_nodes_own(nodes: tuple[Store, Store]) -> None:
    """The association limits are each node's, and a node gone has its open ones ended."""
    a, b = nodes

    def open_one(store: Store, node: str, n: int) -> bool:
        audit = AssociationAudit(
            f"{node}-{n}", "10.0.0.7", 4000 + n, "SCANNER", "INFERGATE", False, "accepted",
            None, 100.0, node=node,
        )  # fmt: skip
        return store.admit(audit, lambda total, _: _Full() if total >= 1 else None, 100.0) is None

    assert open_one(a, "a", 1)
    assert not open_one(a, "a", 2)  # a's one slot is taken
    assert open_one(b, "b", 3)  # b has its own
    assert b.take_over("b", 111.0, LEASE, 3).associations == 1
    assert {x.association_id: x.outcome for x in b.associations()} == {
        "a-1": "aborted",
        "a-2": "rejected",
        "b-3": "accepted",
    }


class _Full:
    reason = "no slot left"


def test_operators_see_each_node_alive_or_gone_with_what_it_holds(
    nodes: tuple[Store, Store],
) -> None:
    a, b = nodes
    _job(a, "job1", "a", 101.0)
    b.beat("b", 112.0, version="test")
    views = {v.node: v for v in b.node_views(112.0, LEASE)}
    assert (views["a"].alive, views["a"].running_jobs) == (False, 1)
    assert (views["b"].alive, views["b"].running_jobs) == (True, 0)
    b.leave("b")
    assert [v.node for v in a.node_views(112.0, LEASE)] == ["a"]


def test_a_lone_node_forgets_the_names_it_had(nodes: tuple[Store, Store]) -> None:
    """On SQLite there is one node: a host renamed since is not a node gone."""
    a, _ = nodes
    a.recover(200.0, 3)
    assert a.nodes() == []


def test_a_gone_node_is_forgotten_once_its_work_was_taken_over(
    nodes: tuple[Store, Store],
) -> None:
    a, b = nodes
    _job(a, "job1", "a", 101.0)
    with pytest.raises(RefusedError, match="alive"):
        b.forget("a", 105.0, LEASE)
    with pytest.raises(RefusedError, match="still holds 1"):
        b.forget("a", 120.0, LEASE)
    assert b.take_over("b", 120.0, LEASE, 3).requeued == ["job1"]
    b.forget("a", 121.0, LEASE)
    assert [n.node for n in b.nodes()] == ["b"]
    with pytest.raises(NotFoundError):
        b.forget("a", 122.0, LEASE)
