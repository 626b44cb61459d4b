from __future__ import annotations

import time
from pathlib import Path

import pydicom
import structlog
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from infergate.config import Settings
from infergate.inference.triton import TritonClient
from infergate.pipeline import Pipeline
from infergate.plugins import discover
from infergate.store import InstanceRecord, NewJob, ResultRow, Store
from infergate.testing import ChestPhantom
from peers import free_port


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


def test_urgent_results_go_first_with_c_store_priority_high(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    received: list[tuple[str, int]] = []

    def on_store(event: evt.Event) -> int:
        request = event.request
        assert isinstance(request, C_STORE)
        received.append((str(event.dataset.SOPInstanceUID), int(request.Priority)))
        return 0x0000

    scp = AE(ae_title="PACS")
    scp.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        store = Store(tmp_path / "s.db")
        paths = sorted(small_phantom.paths)
        jobs = [("normal-job", paths[0], "normal"), ("urgent-job", paths[1], "urgent")]
        for index, (job_id, path, priority) in enumerate(jobs):
            _completed_series(store, f"series-{job_id}", [NewJob(job_id, "ct_lung")], now=index)
            uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            row = ResultRow(uid, job_id, "seg", path, "pending", 0, priority)  # type: ignore[arg-type]
            store.finish_job(job_id, [row], now=10.0 + index)  # the urgent one is newer
        settings = Settings.model_validate(
            {"export": {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}}
        )
        client = TritonClient("127.0.0.1:1", timeout_s=1)  # never called
        with structlog.testing.capture_logs() as logs:
            Pipeline(settings, store, [], client).export()
        client.close()
    finally:
        server.shutdown()
    sent = [(e["sop_instance_uids"][0], e["priority"]) for e in logs if e["event"] == "export.sent"]
    assert [priority for _, priority in sent] == ["urgent", "normal"]
    # What the PACS saw: the urgent one first, as HIGH (1); the other MEDIUM (0).
    assert [priority for _, priority in received] == [1, 0]
    assert [uid for uid, _ in received] == [uid for uid, _ in sent]


def _lung_job(store: Store, small_phantom: ChestPhantom) -> None:
    for index, path in enumerate(small_phantom.paths):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        store.record_instance(
            InstanceRecord(
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                small_phantom.series_uid,
                small_phantom.study_uid,
                "CT",
                path,
                1,
                "a",
                "SCANNER",
                "INFERGATE",
                str(index),
            ),
            now=1.0,
        )
    (series,) = store.receiving_series()
    assert store.complete_series(series, [NewJob("lung", "ct_lung")], now=2.0)


def test_triton_unavailable_is_retried_with_backoff_then_fails_the_job(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    store = Store(tmp_path / "s.db")
    _lung_job(store, small_phantom)
    settings = Settings.model_validate(
        {"triton": {"unavailable_attempts": 3, "retry_delay_s": 0, "max_retry_delay_s": 0}}
    )
    client = TritonClient("127.0.0.1:1", timeout_s=5)  # nothing listens: UNAVAILABLE
    lung = [p for p in discover() if p.spec.name == "ct_lung"]
    with structlog.testing.capture_logs() as logs:
        Pipeline(settings, store, lung, client).step()
    client.close()
    retrying = [e for e in logs if e["event"] == "inference.job.retrying"]
    assert [(e["attempt"], e["of"]) for e in retrying] == [(1, 3), (2, 3)]
    (failed,) = [e for e in logs if e["event"] == "inference.job.failed"]
    assert failed["error"] == "TritonUnavailableError"
    assert "(tried 3 times)" in failed["reason"]
    job = store.job("lung")
    assert (job.state, job.attempts) == ("failed", 3)


def test_a_job_waiting_to_retry_lets_others_run_and_keeps_its_reason(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    store = Store(tmp_path / "s.db")
    _lung_job(store, small_phantom)
    settings = Settings.model_validate({"triton": {"retry_delay_s": 30}})
    client = TritonClient("127.0.0.1:1", timeout_s=5)
    lung = [p for p in discover() if p.spec.name == "ct_lung"]
    with structlog.testing.capture_logs() as logs:
        Pipeline(settings, store, lung, client).step()
    client.close()
    (retrying,) = [e for e in logs if e["event"] == "inference.job.retrying"]
    assert retrying["retry_in_s"] == 30
    job = store.job("lung")
    assert (job.state, job.attempts) == ("pending", 1)
    assert job.error is not None
    assert job.error.startswith("Triton model 'ct_lung_seg' failed")
    # Not runnable before its time, runnable after it.
    assert store.next_job() is None
    assert store.runnable_jobs() == []
    later = store.next_job(now=time.time() + 31)
    assert later is not None
    assert later.job_id == "lung"
