"""Driving the gateway's own workers from a test, in rounds, until they are idle."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

from infergate.config import Settings
from infergate.export.worker import ExportWorker
from infergate.inference.triton import TritonClient
from infergate.plugins import LoadedPlugin
from infergate.store import InstanceRecord, NewJob, Store
from infergate.work.scheduler import JobScheduler
from infergate.work.states import JobKind, Priority
from peers import wait_until


def run_until_idle(
    settings: Settings,
    store: Store,
    plugins: list[LoadedPlugin],
    triton: TritonClient,
    timeout: float = 120,
) -> None:
    """Inference and export rounds, as ``serve`` runs them, until nothing is queued,
    running, unplanned or due."""
    scheduler = JobScheduler(settings, store, plugins, triton)
    exporter = ExportWorker(settings, store)

    def idle() -> bool:
        scheduler.step()
        exporter.step()
        return (
            not store.runnable_jobs()
            and not scheduler.running()
            and not store.unplanned_results()
            and not store.due_deliveries(time.time())
            and not exporter.busy()
        )

    try:
        wait_until(idle, timeout, "the workers to be idle", interval=0.05)
    finally:
        exporter.shutdown(wait_s=5)


def record_series(store: Store, series_uid: str, paths: Sequence[Path], now: float) -> None:
    for index, path in enumerate(paths):
        store.record_instance(
            InstanceRecord(
                f"{series_uid}.{index}",
                "1.2.840.10008.5.1.4.1.1.2",
                series_uid,
                "st1",
                "CT",
                path,
                path.stat().st_size if path.exists() else 1,
                "a",
                "SCANNER",
                "INFERGATE",
                f"{series_uid}.{index}",
            ),
            now=now,
        )


def queue_job(
    store: Store,
    job_id: str,
    plugin: str,
    paths: Sequence[Path],
    *,
    priority: Priority = "normal",
    now: float = 1.0,
) -> None:
    series_uid = f"series-{job_id}"
    record_series(store, series_uid, paths, now)
    (series,) = [s for s in store.receiving_series() if s.series_uid == series_uid]
    assert store.complete_series(
        series, [NewJob(job_id, JobKind.INFERENCE, plugin, priority)], now=now
    )


def drain_jobs(scheduler: JobScheduler, store: Store, timeout: float = 60) -> None:
    """Run rounds until nothing is queued or running."""

    def idle() -> bool:
        scheduler.step()
        return not store.runnable_jobs() and not scheduler.running()

    wait_until(idle, timeout, "the queue to drain", interval=0.05)
