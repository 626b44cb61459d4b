from __future__ import annotations

from pathlib import Path

import structlog

from infergate.config import Settings
from infergate.inference.triton import TritonClient
from infergate.pipeline import Pipeline
from infergate.store import InstanceRecord, NewJob, ResultRow, Store


def test_without_a_destination_results_stay_on_disk_and_the_log_says_so(
    tmp_path: Path,
) -> None:
    store = Store(tmp_path / "s.db")
    store.record_instance(
        InstanceRecord(
            "1.1",
            "1.2.840.10008.5.1.4.1.1.2",
            "s1",
            "st1",
            "CT",
            Path("/spool/a.dcm"),
            1,
            "a",
            "SCANNER",
            "INFERGATE",
            "aa",
        ),
        now=1.0,
    )
    (series,) = store.receiving_series()
    store.complete_series(series, [NewJob("job1", "ct_lung")], now=2.0)
    result = tmp_path / "sr.dcm"
    result.write_bytes(b"result")
    store.finish_job("job1", [ResultRow("9.1", "job1", "sr", result, "pending", 0)], now=3.0)

    client = TritonClient("127.0.0.1:1", timeout_s=1)  # never called: nothing to infer
    pipeline = Pipeline(Settings(), store, [], client)
    with structlog.testing.capture_logs() as logs:
        pipeline.export()
    client.close()
    skipped = [e for e in logs if e["event"] == "export.skipped"]
    assert skipped[0]["paths"] == [str(result)]
    assert store.pending_results() == []
    assert result.exists()


class _ArrivingStore(Store):
    """A store in which an urgent series' job appears while the first job runs."""

    arrival: NewJob | None = None

    def fail_job(self, job_id: str, error: str, now: float) -> None:
        super().fail_job(job_id, error, now)
        if self.arrival is not None:
            arrival, self.arrival = self.arrival, None
            _completed_series(self, f"series-{arrival.job_id}", [arrival], now)


def _completed_series(store: Store, series_uid: str, jobs: list[NewJob], now: float) -> None:
    store.record_instance(
        InstanceRecord(
            f"{series_uid}.1",
            "1.2.840.10008.5.1.4.1.1.2",
            series_uid,
            "st1",
            "CT",
            Path("/spool/missing.dcm"),
            1,
            "a",
            "SCANNER",
            "INFERGATE",
            series_uid,
        ),
        now=now,
    )
    (series,) = [s for s in store.receiving_series() if s.series_uid == series_uid]
    assert store.complete_series(series, jobs, now=now)


def test_an_urgent_job_goes_before_the_normal_jobs_still_queued(tmp_path: Path) -> None:
    store = _ArrivingStore(tmp_path / "s.db")
    for index in range(3):
        _completed_series(store, f"normal{index}", [NewJob(f"n{index}", f"n{index}")], now=index)
    store.arrival = NewJob("u", "u", "urgent")  # arrives once the first job is done
    # No plugin is installed, so each job fails at once, naming its plugin (= its id).
    client = TritonClient("127.0.0.1:1", timeout_s=1)  # never called
    pipeline = Pipeline(Settings(), store, [], client)
    with structlog.testing.capture_logs() as logs:
        pipeline.step()
    client.close()
    order = [e["plugin"] for e in logs if e["event"] == "inference.job.failed"]
    assert order == ["n0", "u", "n1", "n2"]
