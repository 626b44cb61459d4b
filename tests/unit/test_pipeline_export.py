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
