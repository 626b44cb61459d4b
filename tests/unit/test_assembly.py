from __future__ import annotations

from pathlib import Path

import structlog

from infergate.dicom.assembly import complete_quiet_series
from infergate.plugins import LoadedPlugin
from infergate.store import InstanceRecord, Store
from infergate_plugins.ct_lung import plugin as ct_lung


def _receive(store: Store, uid: str, series: str, modality: str, at: float) -> None:
    store.record_instance(
        InstanceRecord(
            uid,
            "1.2.840.10008.5.1.4.1.1.2",
            series,
            "1.9",
            modality,
            Path(f"/spool/{uid}.dcm"),
            1,
            "a",
            "SCANNER",
            "INFERGATE",
            uid,
        ),
        now=at,
    )


def test_series_completes_after_the_quiet_period_and_is_routed(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    plugins = [LoadedPlugin(ct_lung, "test")]
    _receive(store, "1.1", "ct-series", "CT", at=100.0)
    _receive(store, "2.1", "mr-series", "MR", at=100.0)
    assert complete_quiet_series(store, plugins, now=105.0, quiet_period_s=10.0) == []
    assert len(store.receiving_series()) == 2
    with structlog.testing.capture_logs() as logs:
        jobs = complete_quiet_series(store, plugins, now=110.0, quiet_period_s=10.0)
    assert len(jobs) == 1
    assert store.job(jobs[0]).series_uid == "ct-series"
    assert store.receiving_series() == []
    events = [e["event"] for e in logs]
    assert events.count("assembly.series.complete") == 2
    assert events.count("routing.series.unmatched") == 1
