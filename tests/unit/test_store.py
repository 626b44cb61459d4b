from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from infergate.store import InstanceRecord, NewJob, ResultRow, Store


def _record(uid: str, series: str = "1.2.3", path: str = "/spool/a.dcm") -> InstanceRecord:
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
    )


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(tmp_path / "state.db")


def test_commits_are_durable_settings(tmp_path: Path, store: Store) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    # synchronous is per connection; the store's own must be FULL (2).
    assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2


def test_duplicate_instance_is_not_recorded_twice(store: Store) -> None:
    assert store.record_instance(_record("1.1"), now=10.0)
    assert not store.record_instance(_record("1.1", path="/spool/b.dcm"), now=11.0)
    (series,) = store.receiving_series()
    assert series.instance_count == 1
    assert store.instance_paths("1.2.3") == [Path("/spool/a.dcm")]


def test_series_completes_with_its_jobs_in_one_step(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    store.record_instance(_record("1.2"), now=11.0)
    (series,) = store.receiving_series()
    assert series.last_received_at == 11.0
    assert store.complete_series(series, [NewJob("job1", "ct_lung")], now=20.0)
    assert store.receiving_series() == []
    (job,) = store.runnable_jobs()
    assert (job.job_id, job.plugin, job.state, job.study_uid) == (
        "job1",
        "ct_lung",
        "pending",
        "1.2",
    )


def test_completion_loses_to_a_late_instance(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    (stale,) = store.receiving_series()
    store.record_instance(_record("1.2"), now=12.0)
    assert not store.complete_series(stale, [NewJob("job1", "ct_lung")], now=20.0)
    assert store.runnable_jobs() == []


def test_new_instance_reopens_a_complete_series_as_a_new_generation(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    store.complete_series(series, [NewJob("job1", "ct_lung")], now=20.0)
    store.record_instance(_record("1.2"), now=30.0)
    (reopened,) = store.receiving_series()
    assert reopened.generation == 1
    assert reopened.instance_count == 2
    assert store.complete_series(reopened, [NewJob("job2", "ct_lung")], now=40.0)
    assert [j.job_id for j in store.runnable_jobs()] == ["job1", "job2"]


def test_job_and_result_lifecycle_and_recovery(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    store.complete_series(series, [NewJob("job1", "ct_lung")], now=20.0)
    store.start_job("job1", now=21.0)
    assert store.runnable_jobs() == []
    assert store.recover(now=22.0) == 1  # a crash left it running
    (job,) = store.runnable_jobs()
    assert job.attempts == 1
    store.start_job("job1", now=23.0)
    results = [
        ResultRow("9.1", "job1", "seg", Path("/r/seg.dcm"), "pending", 0),
        ResultRow("9.2", "job1", "sr", Path("/r/sr.dcm"), "pending", 0),
    ]
    store.finish_job("job1", results, now=24.0)
    assert store.job("job1").state == "done"
    assert [r.kind for r in store.pending_results()] == ["seg", "sr"]
    store.mark_results_attempted(["9.1", "9.2"], "refused", give_up=False)
    assert len(store.pending_results()) == 2
    store.mark_results_sent(["9.1", "9.2"], now=25.0)
    assert store.pending_results() == []
    assert {r.state for r in store.results()} == {"sent"}


def test_failed_job_keeps_its_reason(store: Store) -> None:
    store.record_instance(_record("1.1"), now=10.0)
    (series,) = store.receiving_series()
    store.complete_series(series, [NewJob("job1", "ct_lung")], now=20.0)
    store.fail_job("job1", "model failed", now=21.0)
    job = store.job("job1")
    assert (job.state, job.error) == ("failed", "model failed")
    assert store.runnable_jobs() == []
