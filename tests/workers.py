"""Driving the gateway's own workers from a test, in rounds, until they are idle."""

from __future__ import annotations

import time

from infergate.config import Settings
from infergate.export.worker import ExportWorker
from infergate.inference.triton import TritonClient
from infergate.plugins import LoadedPlugin
from infergate.store import Store
from infergate.work.scheduler import JobScheduler
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
