"""The gateway's metrics, in Prometheus' text format (prometheus-client), names
prefixed ``infergate_``.

Two kinds: events counted where they happen (jobs ended, each job's stage durations,
delivery attempts by outcome class), and gauges read from the store, Triton and the
file system at each scrape (queue depth, the oldest undelivered result, dead letters,
Triton up, free bytes, listener processes up). Labels are plugin names, stage names,
states, priorities, outcome classes and destination AE titles, never a UID or anything
from a patient's data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, ProcessCollector
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from infergate.store import Store

REGISTRY = CollectorRegistry()
ProcessCollector(namespace="infergate", registry=REGISTRY)

NODE = Info(
    "infergate_node",
    "This gateway node: its name (node.name, on its log lines and job records too) and"
    " Infergate's version.",
    registry=REGISTRY,
)

JOBS_ENDED = Counter(
    "infergate_jobs_ended",
    "Jobs that ended, by plugin ('' for a forward job) and final state.",
    ["plugin", "state"],
    registry=REGISTRY,
)
JOB_STAGE_SECONDS = Histogram(
    "infergate_job_stage_seconds",
    "How long each stage of a job took, by plugin and stage: assembly_wait (from the"
    " series' last instance to its completion), then, for a finished job, volume,"
    " preprocess, inference (the Triton round trip: transfer, queue and compute),"
    " postprocess, encode, write.",
    ["plugin", "stage"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 150, 600),
    registry=REGISTRY,
)
JOB_PEAK_MEMORY = Histogram(
    "infergate_job_peak_memory_bytes",
    "The peak resident memory of a finished job's process, by plugin (the volume, the"
    " plugin's steps and encoding; Triton's copy of the inputs and the model's own"
    " memory are in tritonserver and its stub).",
    ["plugin"],
    buckets=tuple(2.0**n * 2**20 for n in range(6, 16)),  # 64 MiB to 32 GiB
    registry=REGISTRY,
)
SERIES_COMPLETED = Counter(
    "infergate_series_completed",
    "Series that assembly found complete, by what completed them: quiet (the quiet"
    " period passed), released (the sender released its association), max_age.",
    ["trigger"],
    registry=REGISTRY,
)
DELIVERY_ATTEMPTS = Counter(
    "infergate_delivery_attempts",
    "Delivery attempts by destination AE title and the class of their outcome"
    " (delivered, warning, transient, permanent).",
    ["destination", "outcome"],
    registry=REGISTRY,
)
DELIVERY_SECONDS = Histogram(
    "infergate_delivery_seconds",
    "How long one delivery attempt's association took, by destination AE title.",
    ["destination"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)


def job_ended(
    plugin: str,
    state: str,
    timings_s: dict[str, float] | None = None,
    *,
    peak_memory_bytes: int = 0,
) -> None:
    """Count a job that ended; a finished one's stage durations and the peak memory of
    its process (when it had one) too."""
    JOBS_ENDED.labels(plugin, state).inc()
    for key, seconds in (timings_s or {}).items():
        JOB_STAGE_SECONDS.labels(plugin, key.removesuffix("_s")).observe(seconds)
    if peak_memory_bytes:
        JOB_PEAK_MEMORY.labels(plugin).observe(peak_memory_bytes)


def series_completed(trigger: str, waited_s: float, plugins: list[str]) -> None:
    """Count a completed series; its wait from the last instance to completion is
    each of its jobs' first stage (``assembly_wait``)."""
    SERIES_COMPLETED.labels(trigger).inc()
    for plugin in plugins:
        JOB_STAGE_SECONDS.labels(plugin, "assembly_wait").observe(waited_s)


def delivery_attempted(destination: str, outcome: str, seconds: float) -> None:
    """Count one delivery attempt and time its association."""
    DELIVERY_ATTEMPTS.labels(destination, outcome).inc()
    DELIVERY_SECONDS.labels(destination).observe(seconds)


@dataclass
class LiveSources:
    """Where the scrape-time gauges come from, in the running gateway."""

    store: Store
    spool_dir_free: Callable[[], int]
    spool_min_free: int
    triton_ready: Callable[[], bool]
    listener_processes: Callable[[], tuple[int, int]]  # (alive, configured)
    lease_s: float  # work.lease_s: a node that beat within it is alive
    destinations: tuple[str, ...] = ()  # the configured destinations' AE titles


class PipelineCollector(Collector):
    """Gauges read at each scrape."""

    def __init__(self, sources: LiveSources) -> None:
        self._sources = sources

    def collect(self) -> Iterator[Metric]:
        gauges = self._sources.store.pipeline_gauges()
        jobs = GaugeMetricFamily(
            "infergate_jobs_waiting",
            "Jobs queued or running, by state and priority.",
            labels=["state", "priority"],
        )
        for state in ("queued", "running"):
            for priority in ("urgent", "normal"):
                jobs.add_metric([state, priority], gauges.jobs_waiting.get((state, priority), 0))
        yield jobs
        deliveries = GaugeMetricFamily(
            "infergate_deliveries_open",
            "Deliveries not yet ended, by state (pending, sending, retry_wait) and"
            " destination AE title.",
            labels=["state", "destination"],
        )
        # Every configured destination in every open state, 0 included, so that a
        # dashboard shows the quiet ones too.
        keys = set(gauges.deliveries_open) | {
            (state, ae_title)
            for state in ("pending", "sending", "retry_wait")
            for ae_title in self._sources.destinations
        }
        for state, destination in sorted(keys):
            deliveries.add_metric(
                [state, destination], gauges.deliveries_open.get((state, destination), 0)
            )
        yield deliveries
        oldest = gauges.oldest_undelivered_at
        yield GaugeMetricFamily(
            "infergate_oldest_undelivered_result_age_seconds",
            "Age of the oldest result not yet delivered (0: none waits).",
            value=0.0 if oldest is None else max(0.0, time.time() - oldest),
        )
        dead = GaugeMetricFamily(
            "infergate_dead_letters",
            "Dead letters now held, by kind: jobs, deliveries, result objects, notifications.",
            labels=["kind"],
        )
        dead.add_metric(["job"], gauges.dead_jobs)
        dead.add_metric(["delivery"], gauges.dead_deliveries)
        dead.add_metric(["object"], gauges.dead_objects)
        dead.add_metric(["notification"], gauges.dead_notifications)
        yield dead
        yield GaugeMetricFamily(
            "infergate_triton_up",
            "1 when Triton answers that it is ready.",
            value=1.0 if self._sources.triton_ready() else 0.0,
        )
        yield GaugeMetricFamily(
            "infergate_spool_free_bytes",
            "Free bytes on the spool's file system.",
            value=float(self._sources.spool_dir_free()),
        )
        yield GaugeMetricFamily(
            "infergate_spool_min_free_bytes",
            "Below this many free bytes ingest refuses instances (ingest.min_free_bytes).",
            value=float(self._sources.spool_min_free),
        )
        alive, configured = self._sources.listener_processes()
        listeners = GaugeMetricFamily(
            "infergate_listener_processes",
            "Listener processes: up, and configured.",
            labels=["status"],
        )
        listeners.add_metric(["up"], alive)
        listeners.add_metric(["configured"], configured)
        yield listeners
        views = self._sources.store.node_views(time.time(), self._sources.lease_s)
        nodes = GaugeMetricFamily(
            "infergate_nodes",
            "Gateway nodes sharing the state store: alive (beat within work.lease_s), or"
            " gone (their work is taken over; a node stopped in order is not counted).",
            labels=["state"],
        )
        nodes.add_metric(["alive"], sum(v.alive for v in views))
        nodes.add_metric(["gone"], sum(not v.alive for v in views))
        yield nodes
