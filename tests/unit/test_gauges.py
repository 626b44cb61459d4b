"""The scrape-time gauges: what the store says of the pipeline now, as metrics."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from workers import queue_job

from infergate.config import Settings
from infergate.ops.metrics import LiveSources, PipelineCollector
from infergate.store import ResultRow, Store
from infergate.work.states import ResultKind


def _scrape(store: Store) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    sources = LiveSources(
        store=store,
        spool_dir_free=lambda: 12345,
        spool_min_free=1000,
        triton_ready=lambda: False,
        listener_processes=lambda: (1, 2),
        lease_s=30.0,
        destinations=("PACS", "ARCHIVE"),
    )
    registry.register(PipelineCollector(sources))
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_queue_depth_undelivered_age_and_what_is_down(database: Path | str, tmp_path: Path) -> None:
    store = Store(database)
    queue_job(store, "normal", "p", [tmp_path / "a.dcm"], now=1.0)
    queue_job(store, "urgent", "p", [tmp_path / "b.dcm"], priority="urgent", now=2.0)
    queue_job(store, "done", "p", [tmp_path / "c.dcm"], now=3.0)
    store.start_job("done", 4.0)
    result = ResultRow("sr-1", "done", ResultKind.SR, tmp_path / "sr.dcm")
    store.finish_job("done", [result], 100.0)
    settings = Settings.model_validate(
        {"export": {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}}
    )
    assert settings.export.destination is not None
    store.plan_delivery("st1", settings.export.destination, "INFERGATE", [result], 100.0)
    samples = _scrape(store)
    waiting = "infergate_jobs_waiting"
    assert samples[(waiting, (("priority", "normal"), ("state", "queued")))] == 1
    assert samples[(waiting, (("priority", "urgent"), ("state", "queued")))] == 1
    assert samples[(waiting, (("priority", "normal"), ("state", "running")))] == 0
    open_key = ("infergate_deliveries_open", (("destination", "PACS"), ("state", "pending")))
    assert samples[open_key] == 1
    quiet = ("infergate_deliveries_open", (("destination", "ARCHIVE"), ("state", "retry_wait")))
    assert samples[quiet] == 0
    assert samples[("infergate_oldest_undelivered_result_age_seconds", ())] > 1e9  # since 100
    assert samples[("infergate_triton_up", ())] == 0
    assert samples[("infergate_spool_free_bytes", ())] == 12345
    assert samples[("infergate_spool_min_free_bytes", ())] == 1000
    assert samples[("infergate_listener_processes", (("status", "up"),))] == 1
    assert samples[("infergate_listener_processes", (("status", "configured"),))] == 2
    assert samples[("infergate_dead_letters", (("kind", "delivery"),))] == 0
    assert samples[("infergate_dead_letters", (("kind", "notification"),))] == 0


def test_nodes_alive_and_gone(database: Path | str) -> None:
    store = Store(database)
    now = time.time()
    store.beat("alive", now - 5, started_at=now - 100, version="test")
    store.beat("gone", now - 60, started_at=now - 100, version="test")  # lease 30 s
    store.beat("stopped", now - 5, started_at=now - 100, version="test")
    store.leave("stopped")
    samples = _scrape(store)
    assert samples[("infergate_nodes", (("state", "alive"),))] == 1
    assert samples[("infergate_nodes", (("state", "gone"),))] == 1
