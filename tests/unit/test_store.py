from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from infergate.codes import HEMORRHAGE, PRESENT
from infergate.config import Destination
from infergate.errors import NotFoundError, RefusedError
from infergate.store import Arrival, CriticalFinding, InstanceRecord, NewJob, ResultRow, Store
from infergate.work.states import JobKind, JobState, NotificationState, ResultKind, ResultState


def _record(
    uid: str, series: str = "1.2.3", path: str = "/spool/a.dcm", sha256: str = "aa"
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=uid,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        series_uid=series,
        study_uid="1.2",
        modality="CT",
        path=Path(path),
        size=10,
        association_id="a1",
        calling_ae="SCANNER",
        called_ae="INFERGATE",
        sha256=sha256,
    )


def _recovered(store: Store, now: float, max_interruptions: int) -> tuple[list[str], list[str]]:
    """What a lone node's start took back: the requeued and the dead jobs."""
    recovered = store.recover(now, max_interruptions)
    return recovered.requeued, recovered.dead


@pytest.fixture
def store(database: Path | str) -> Store:
    return Store(database)


def test_commits_are_durable_settings(store: Store) -> None:
    with store._reading() as db:
        if store.backend == "sqlite":
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            # synchronous is per connection; the store's own must be FULL (2).
            assert db.execute("PRAGMA synchronous").fetchone()[0] == 2
        else:
            # A commit returns once it is in the WAL on disk, whatever the server's default.
            assert db.execute("SHOW synchronous_commit").fetchone()[0] == "on"


def test_duplicate_instance_is_not_recorded_twice(store: Store) -> None:
    assert store.record_instance(_record("1.1"), now=10.0).arrival is Arrival.NEW
    again = store.record_instance(_record("1.1", path="/spool/b.dcm"), now=11.0)
    assert again.arrival is Arrival.DUPLICATE
    (series,) = store.receiving_series()
    assert series.instance_count == 1
    assert series.last_received_at == 10.0
    assert store.instance_paths("1.2.3") == [Path("/spool/a.dcm")]


def test_changed_instance_keeps_the_first_by_default(store: Store) -> None:
    _one_job(store)
    changed = store.record_instance(_record("1.1", path="/spool/b.dcm", sha256="bb"), now=30.0)
    assert changed.arrival is Arrival.CHANGED_KEPT
    assert store.instance_paths("1.2.3") == [Path("/spool/a.dcm")]
    assert store.receiving_series() == []  # nothing to process again


def test_changed_instance_can_replace_and_reprocess(store: Store) -> None:
    _one_job(store)
    changed = store.record_instance(
        _record("1.1", path="/spool/b.dcm", sha256="bb"), replace_changed=True, now=30.0
    )
    assert changed.arrival is Arrival.CHANGED_REPLACED
    assert changed.superseded_path == Path("/spool/a.dcm")
    assert store.instance_paths("1.2.3") == [Path("/spool/b.dcm")]
    (reopened,) = store.receiving_series()
    assert (reopened.instance_count, reopened.generation) == (1, 1)


def test_a_database_from_before_duplicate_detection_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE instances (sop_instance_uid TEXT PRIMARY KEY, sop_class_uid TEXT NOT"
        " NULL, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL, path TEXT NOT NULL, size"
        " INTEGER NOT NULL, association_id TEXT NOT NULL, received_at REAL NOT NULL)"
    )
    old.execute("INSERT INTO instances VALUES ('1.1', '1.2', '1.2.3', '1.2', '/a', 1, 'x', 1.0)")
    old.commit()
    old.close()
    store = Store(path)
    assert store.record_instance(_record("1.1"), now=2.0).arrival is Arrival.CHANGED_KEPT
    assert store.record_instance(_record("1.2"), now=3.0).arrival is Arrival.NEW


def test_a_version_6_database_gets_routes_stage_times_and_replays(tmp_path: Path) -> None:
    path = tmp_path / "v6.db"
    Store(path).close()
    old = sqlite3.connect(path)
    for table, column in (("jobs", "route"), ("jobs", "timings"), ("deliveries", "replayed_to")):
        old.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
    old.execute("PRAGMA user_version = 6")
    old.commit()
    old.close()
    store = Store(path)
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    job = NewJob(
        "job1", JobKind.INFERENCE, "ct_lung", route='{"trigger": "quiet", "decisions": []}'
    )
    assert store.complete_series(series, [job], now=20.0)
    assert store.start_job("job1", 21.0)
    assert store.finish_job("job1", [], 22.0, {"volume_s": 0.5})
    detail = store.job_detail("job1")
    assert detail.route == {"trigger": "quiet", "decisions": []}
    assert detail.job.timings_s == {"volume_s": 0.5}


def test_series_completes_with_its_jobs_in_one_step(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    store.record_instance(_record("1.2"), now=11.0)
    (series,) = store.receiving_series()
    assert series.last_received_at == 11.0
    assert store.complete_series(series, [NewJob("job1", JobKind.INFERENCE, "ct_lung")], now=20.0)
    assert store.receiving_series() == []
    (job,) = store.runnable_jobs()
    assert (job.job_id, job.plugin, job.state, job.study_uid) == (
        "job1",
        "ct_lung",
        JobState.QUEUED,
        "1.2",
    )


def test_completion_loses_to_a_late_instance(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    (stale,) = store.receiving_series()
    store.record_instance(_record("1.2"), now=12.0)
    assert not store.complete_series(
        stale, [NewJob("job1", JobKind.INFERENCE, "ct_lung")], now=20.0
    )
    assert store.runnable_jobs() == []


def test_new_instance_reopens_a_complete_series_as_a_new_generation(store: Store) -> None:
    _one_job(store)
    store.record_instance(_record("1.2"), now=30.0)
    (reopened,) = store.receiving_series()
    assert reopened.generation == 1
    assert reopened.instance_count == 2
    assert store.complete_series(reopened, [NewJob("job2", JobKind.INFERENCE, "ct_lung")], now=40.0)
    assert [j.job_id for j in store.runnable_jobs()] == ["job1", "job2"]


def _one_job(store: Store) -> None:
    """Job ``job1`` of a series of one instance, queued at 20.0."""
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    store.complete_series(series, [NewJob("job1", JobKind.INFERENCE, "ct_lung")], now=20.0)


def test_job_lifecycle_and_recovery(store: Store) -> None:
    _one_job(store)
    assert store.start_job("job1", now=21.0)
    assert not store.start_job("job1", now=21.5)  # running already: the table refuses
    assert store.runnable_jobs() == []
    assert _recovered(store, 22.0, 3) == (["job1"], [])  # a crash
    (job,) = store.runnable_jobs()
    assert (job.attempts, job.interruptions) == (1, 1)
    store.start_job("job1", now=23.0)
    results = [
        ResultRow("9.1", "job1", ResultKind.SEG, Path("/r/seg.dcm")),
        ResultRow("9.2", "job1", ResultKind.SR, Path("/r/sr.dcm")),
    ]
    assert store.finish_job("job1", results, now=24.0)
    assert store.job("job1").state is JobState.DONE
    assert [u.result.kind for u in store.unplanned_results()] == [ResultKind.SEG, ResultKind.SR]
    # Done is final for the worker: a late fail (a deadline) changes nothing.
    assert not store.fail_job("job1", "too late", now=25.0)
    assert store.job("job1").state is JobState.DONE


def test_a_job_failed_at_its_deadline_cannot_be_finished_after(store: Store) -> None:
    _one_job(store)
    store.start_job("job1", now=21.0)
    assert store.fail_job("job1", "ran past its deadline", now=30.0)
    result = ResultRow("9.1", "job1", ResultKind.SR, Path("/r/sr.dcm"))
    assert not store.finish_job("job1", [result], now=31.0)
    assert store.results() == []
    assert store.job("job1").state is JobState.FAILED


def test_a_job_interrupted_max_interruptions_times_is_a_dead_letter(store: Store) -> None:
    _one_job(store)
    store.start_job("job1", now=21.0)
    assert _recovered(store, 22.0, 2) == (["job1"], [])
    store.start_job("job1", now=23.0)
    assert _recovered(store, 24.0, 2) == ([], ["job1"])
    job = store.job("job1")
    assert (job.state, job.interruptions) == (JobState.DEAD, 2)
    assert job.error is not None
    assert "interrupted by a process death 2 times" in job.error
    assert store.runnable_jobs() == []


def test_an_orderly_stop_requeues_without_counting_an_interruption(store: Store) -> None:
    _one_job(store)
    store.start_job("job1", now=21.0)
    store.requeue_jobs(["job1"], now=22.0)
    assert _recovered(store, 23.0, 1) == ([], [])
    (job,) = store.runnable_jobs()
    assert (job.state, job.interruptions) == (JobState.QUEUED, 0)


def test_failed_job_keeps_its_reason(store: Store) -> None:
    _one_job(store)
    store.fail_job("job1", "model failed", now=21.0)
    job = store.job("job1")
    assert (job.state, job.error) == (JobState.FAILED, "model failed")
    assert store.runnable_jobs() == []


def test_restart_gives_receiving_series_a_fresh_quiet_period(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    store.recover(now=500.0, max_interruptions=3)
    (series,) = store.receiving_series()
    assert series.last_received_at == 500.0


def _complete(store: Store, series: str, jobs: list[NewJob], now: float) -> None:
    store.record_instance(_record(f"{series}.1", series=series), now=now)
    (row,) = [s for s in store.receiving_series() if s.series_uid == series]
    assert store.complete_series(row, jobs, now=now + 1)


def test_urgent_jobs_run_before_older_normal_ones(store: Store) -> None:
    _complete(store, "9.1", [NewJob("normal1", JobKind.INFERENCE, "ct_lung")], now=10.0)
    _complete(store, "9.2", [NewJob("normal2", JobKind.INFERENCE, "ct_lung", "normal")], now=20.0)
    _complete(store, "9.3", [NewJob("urgent", JobKind.INFERENCE, "ct_lung", "urgent")], now=30.0)
    assert [j.job_id for j in store.runnable_jobs()] == ["urgent", "normal1", "normal2"]
    next_job = store.runnable_jobs()[0]
    assert (next_job.job_id, next_job.priority) == ("urgent", "urgent")
    store.start_job("urgent", now=31.0)
    assert store.job("urgent").priority == "urgent"
    next_job = store.runnable_jobs()[0]
    assert (next_job.job_id, next_job.priority) == ("normal1", "normal")


# The jobs and results tables of version 5, the last before the work model.
_V5_TABLES = """
CREATE TABLE jobs (
    job_id TEXT PRIMARY KEY, series_uid TEXT NOT NULL, study_uid TEXT NOT NULL,
    generation INTEGER NOT NULL, plugin TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'done', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, priority INTEGER NOT NULL DEFAULT 1, not_before REAL,
    UNIQUE (series_uid, generation, plugin)
);
CREATE TABLE results (
    sop_instance_uid TEXT PRIMARY KEY, job_id TEXT NOT NULL REFERENCES jobs(job_id),
    kind TEXT NOT NULL, path TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, error TEXT, created_at REAL NOT NULL,
    sent_at REAL, priority INTEGER NOT NULL DEFAULT 1
);
INSERT INTO jobs VALUES ('j1', 's', 'st', 0, 'ct_lung', 'pending', 0, NULL, 1, 1, 0, NULL);
INSERT INTO jobs VALUES ('j2', 's', 'st', 0, '(forward)', 'done', 1, NULL, 1, 1, 1, NULL);
INSERT INTO results VALUES ('9.1', 'j2', 'forwarded', '/a', 'sent', 1, NULL, 1, 2, 1);
INSERT INTO results VALUES ('9.2', 'j2', 'forwarded', '/b', 'failed', 5, 'x', 1, NULL, 1);
"""


def test_a_version_5_database_moves_to_the_work_model(tmp_path: Path) -> None:
    path = tmp_path / "v5.db"
    Store(path).close()
    old = sqlite3.connect(path)
    old.execute("DROP TABLE delivery_items")
    old.execute("DROP TABLE deliveries")
    old.execute("DROP TABLE results")
    old.execute("DROP TABLE jobs")
    old.executescript(_V5_TABLES)
    old.execute(
        "INSERT INTO series VALUES ('s', 'st', 'CT', 'A', 'INFERGATE', 1, 1, 1, 'complete', 0,"
        " NULL)"
    )
    old.execute("PRAGMA user_version = 5")
    old.commit()
    old.close()
    store = Store(path)
    jobs = {j.job_id: (j.kind, j.plugin, j.state, j.priority) for j in store.jobs()}
    assert jobs == {
        "j1": (JobKind.INFERENCE, "ct_lung", JobState.QUEUED, "urgent"),
        "j2": (JobKind.FORWARD, "", JobState.DONE, "normal"),
    }
    # What was sent stays sent; what the old five tries gave up on gets a delivery now.
    assert [u.result.sop_instance_uid for u in store.unplanned_results()] == ["9.2"]


def test_a_new_generation_supersedes_the_last_done_job_of_its_plugin(store: Store) -> None:
    _one_job(store)
    store.start_job("job1", now=21.0)
    store.finish_job("job1", [], now=22.0)
    store.record_instance(_record("1.2"), now=30.0)  # late: generation 1
    (reopened,) = store.receiving_series()
    jobs = [
        NewJob("job2", JobKind.INFERENCE, "ct_lung"),
        NewJob("other", JobKind.INFERENCE, "ct_head_bleed"),
    ]
    store.complete_series(reopened, jobs, now=40.0)
    assert store.superseded_job("job2") == "job1"
    assert store.superseded_job("other") is None  # another plugin's
    assert store.superseded_job("job1") is None  # the first generation


def _as_version_7(path: Path) -> None:
    """The results and delivery_items tables as version 7 made them (no 'sc' kind, no
    'replaced' state), rebuilt the way SQLite changes a CHECK."""
    old = sqlite3.connect(path)
    for table, added in (("results", ", 'sc'"), ("delivery_items", ", 'replaced'")):
        (sql,) = old.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()
        assert added in sql
        old.execute(f"ALTER TABLE {table} RENAME TO {table}_new")
        old.execute(sql.replace(added, ""))
        old.execute(f"INSERT INTO {table} SELECT * FROM {table}_new")  # noqa: S608
    old.execute("DROP TABLE delivery_items_new")
    old.execute("DROP TABLE results_new")
    old.execute("PRAGMA user_version = 7")
    old.commit()
    old.close()


def test_a_version_7_database_takes_secondary_captures_and_keeps_its_deliveries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v7.db"
    store = Store(path)
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    assert store.complete_series(series, [NewJob("job1", JobKind.INFERENCE, "ct_lung")], 20.0)
    assert store.start_job("job1", 21.0)
    seg = ResultRow("9.1", "job1", ResultKind.SEG, tmp_path / "seg.dcm")
    assert store.finish_job("job1", [seg], 22.0, {})
    destination = Destination(ae_title="PACS", host="127.0.0.1", port=104)
    delivery = store.plan_delivery("1.2", destination, "INFERGATE", [seg], 23.0)
    store.close()
    _as_version_7(path)

    store = Store(path)
    (item,) = store.delivery_items(delivery)
    assert (item.sop_instance_uid, item.state) == ("9.1", ResultState.PENDING)
    job_id, sources = store.result_sources("9.1")
    assert (job_id, sources) == ("job1", [Path("/spool/a.dcm")])
    drawn = [ResultRow(f"9.2.{n}", "job1", ResultKind.SC, tmp_path / f"sc-{n}.dcm") for n in (1, 2)]
    store.replace_with_captures(delivery, "9.1", "no SEG there", drawn, 24.0)
    store.replace_with_captures(delivery, "9.1", "no SEG there", drawn, 25.0)  # again: the same
    states = {i.sop_instance_uid: (i.kind, i.state) for i in store.delivery_items(delivery)}
    assert states == {
        "9.1": (ResultKind.SEG, ResultState.REPLACED),
        "9.2.1": (ResultKind.SC, ResultState.PENDING),
        "9.2.2": (ResultKind.SC, ResultState.PENDING),
    }
    assert sqlite3.connect(path).execute("PRAGMA foreign_key_check").fetchall() == []


def test_a_critical_finding_is_one_notification_per_receiver_committed_with_its_job(
    database: Path | str,
    tmp_path: Path,
) -> None:
    store = Store(database)
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    assert store.complete_series(series, [NewJob("job1", JobKind.INFERENCE, "ct_head_bleed")], 20.0)
    assert store.start_job("job1", 21.0)
    report = ResultRow("9.1", "job1", ResultKind.SR, tmp_path / "sr.dcm")
    finding = CriticalFinding(HEMORRHAGE, PRESENT, None, "ct_head_bleed", "1.0.0", "Bleed", "9.1")
    assert store.finish_job(
        "job1", [report], 22.0, {}, critical=(finding,), receivers=("ris", "pager")
    )
    due = store.due_notifications(23.0)
    assert sorted(n.receiver for n in due) == ["pager", "ris"]
    assert due[0].finding == finding
    assert due[0].report_path == tmp_path / "sr.dcm"
    first = due[0].notification_id
    assert store.claim_notification(first, 24.0)
    assert not store.claim_notification(first, 24.0)  # claimed once
    assert store.recover(25.0, 3).notifications == 1  # a crash while sending: due again
    assert store.claim_notification(first, 26.0)
    store.record_notification(first, NotificationState.DELIVERED, "acknowledged", 27.0, 27.0)
    assert [n.receiver for n in store.due_notifications(30.0)] == [due[1].receiver]
    states = {n.notification_id: (n.state, n.attempts) for n in store.notifications()}
    assert states[first] == (NotificationState.DELIVERED, 2)
    # An operator resends a dead one, with the same id; not one on its way or delivered.
    second = due[1].notification_id
    assert store.claim_notification(second, 31.0)
    store.record_notification(second, NotificationState.DEAD, "HTTP 404", 32.0, 32.0)
    (dead,) = store.notification_views(dead_only=True, limit=10)
    assert (dead.notification_id, dead.finding, dead.reason) == (
        second,
        "Hemorrhage: Present",
        "HTTP 404",
    )
    store.resend_notification(second, 33.0)
    assert [n.notification_id for n in store.due_notifications(33.0)] == [second]
    with pytest.raises(RefusedError, match="not a dead letter"):
        store.resend_notification(first, 34.0)
    with pytest.raises(NotFoundError):
        store.resend_notification("nothing", 34.0)


def test_a_job_records_the_node_that_started_it(store: Store) -> None:
    _one_job(store)
    assert store.start_job("job1", now=21.0, node="ig-node-1")
    assert store.job_detail("job1").job.node == "ig-node-1"
    assert _recovered(store, 22.0, 3) == (["job1"], [])
    # Its next attempt, on another node after a crash, names that one.
    assert store.start_job("job1", now=23.0, node="ig-node-2")
    assert store.job_detail("job1").job.node == "ig-node-2"
    assert [job.node for job in store.job_views()] == ["ig-node-2"]


def test_a_version_9_database_gets_the_node_of_its_jobs(tmp_path: Path) -> None:
    path = tmp_path / "v9.db"
    Store(path).close()
    old = sqlite3.connect(path)
    old.execute("ALTER TABLE jobs DROP COLUMN node")
    old.execute("PRAGMA user_version = 9")
    old.commit()
    old.close()
    store = Store(path)
    _one_job(store)
    assert store.start_job("job1", now=21.0, node="ig-node-1")
    assert store.job_detail("job1").job.node == "ig-node-1"


def test_a_version_10_database_gets_the_nodes_and_what_they_hold(tmp_path: Path) -> None:
    path = tmp_path / "v10.db"
    Store(path).close()
    old = sqlite3.connect(path)
    for table in ("deliveries", "notifications", "associations"):
        old.execute(f"ALTER TABLE {table} DROP COLUMN node")
    old.execute("DROP TABLE nodes")
    old.execute("PRAGMA user_version = 10")
    old.commit()
    old.close()
    store = Store(path)
    store.beat("ig-node-1", 30.0, started_at=30.0, version="test")
    assert [n.node for n in store.nodes()] == ["ig-node-1"]
    _one_job(store)
    assert store.start_job("job1", now=31.0, node="ig-node-1")
    assert store.take_over("ig-node-2", 100.0, 10.0, 3).requeued == ["job1"]
