"""The running gateway's stages: the plugins checked against Triton, the stage loops
and the ops endpoint started, ``serve.ready``, and the watch until a stop.

``serve`` imports this module once it has launched the embedded Triton: its imports
(the scheduler and the job steps, highdicom, export, notifications, the HTTP stack)
take ~1.2 s, which Triton's start then overlaps instead of waiting for.
"""

from __future__ import annotations

import shutil
import threading
import time

from prometheus_client.multiprocess import MultiProcessCollector

from infergate import __version__
from infergate.config import Settings
from infergate.export.worker import ExportWorker
from infergate.inference.embedded import EmbeddedTriton
from infergate.inference.endpoints import Endpoints
from infergate.ingest.listener_pool import ListenerPool
from infergate.logs import get_logger
from infergate.notify.worker import send_due
from infergate.ops.health import Gateway
from infergate.ops.http import OpsServer
from infergate.ops.metrics import NODE, REGISTRY, LiveSources, PipelineCollector, job_ended
from infergate.ops.retention import run_retention, sweep_orphans
from infergate.plugins import LoadedPlugin, check_plugins
from infergate.store import Recovered, Store
from infergate.work.loops import StageLoop, each_interval
from infergate.work.scheduler import JobScheduler

log = get_logger(__name__)


def run_stages(
    settings: Settings,
    store: Store,
    *,
    plugins: list[LoadedPlugin],
    endpoints: Endpoints,
    embedded: EmbeddedTriton | None,
    listeners: ListenerPool,
    taking_since: float,
    recovered: Recovered,
    stop: threading.Event,
) -> bool:
    """The stages started, ready, watched until ``stop``; whether one failed.
    ``recovered``: what this node took back at its start, told here."""
    failed = False
    for url in endpoints.ready():
        check_plugins(endpoints.client(url), plugins)
    _tell_recovered(store, recovered)
    scheduler = JobScheduler(settings, store, plugins, endpoints)
    scheduler.starting()
    exporter = ExportWorker(settings, store)
    stages = _stage_loops(settings, store, scheduler, exporter, stop)
    stages.append(
        StageLoop("triton", each_interval(endpoints.check), settings.triton.health_interval_s, stop)
    )
    for stage in stages:
        stage.start()
    scheduler.accepting(taking_since)
    ops = _start_ops(Gateway(settings, store, endpoints, plugins, stages, listeners))
    log.info(
        "serve.ready",
        version=__version__,
        ae_title=settings.ingest.ae_title,
        port=settings.ingest.port,
        listener_processes=settings.ingest.listener_processes,
        inference_slots=settings.work.slots,
        plugins=[p.spec.name for p in plugins],
        triton=list(endpoints.ready()),
        results_to=[d.described for d in settings.destinations()],
        ops=f"http://{settings.ops.host}:{settings.ops.port}" if settings.ops.enabled else None,
    )
    # The main thread only waits and watches; the signal handler only sets `stop`.
    while not stop.wait(1.0):
        listeners.watch()
        if embedded is not None:
            embedded.watch()
        for stage in stages:
            if not stage.is_alive():
                failure = stage.failure or "its thread ended"
                log.error("serve.stage.died", stage=stage.name, reason=failure)
                failed = True
                stop.set()
    if ops is not None:
        ops.stop()
    listeners.stop()
    for stage in stages:
        stage.join(timeout_s=10)
    scheduler.release_running(wait_s=settings.work.stop_grace_s)
    exporter.shutdown(wait_s=settings.work.stop_grace_s)
    return failed


def _tell_recovered(store: Store, recovered: Recovered, *, taken_over: bool = False) -> None:
    """Log (and count) what was taken back: at this node's start, what it held, or
    (``taken_over``) what the nodes named, gone, held."""
    if taken_over:
        log.warning(
            "work.node.taken_over",
            nodes=list(recovered.nodes),
            jobs_requeued=recovered.requeued,
            jobs_dead=recovered.dead,
            deliveries_due_again=recovered.deliveries,
            notifications_due_again=recovered.notifications,
            associations_ended=recovered.associations,
        )
    elif recovered.requeued:
        log.warning("work.recovered", jobs_requeued=recovered.requeued)
    for job_id in recovered.dead:
        job = store.job(job_id)
        log.error("work.job.dead_letter", job_id=job_id, reason=job.error)
        job_ended(job.plugin, "dead")
    if recovered.notifications and not taken_over:
        log.warning("notify.recovered", notifications_due_again=recovered.notifications)


def _keep_the_lease(store: Store, settings: Settings) -> None:
    """One beat of this node, then whatever a node gone held is taken over."""
    node, now = settings.node.name, time.time()
    store.beat(node, now, version=__version__)
    taken = store.take_over(node, now, settings.work.lease_s, settings.work.max_interruptions)
    if taken:
        _tell_recovered(store, taken, taken_over=True)


def _start_ops(gateway: Gateway) -> OpsServer | None:
    """The ops endpoint, listening, with the gateway's gauges in its metrics."""
    settings = gateway.settings
    if not settings.ops.enabled:
        return None
    sources = LiveSources(
        store=gateway.store,
        spool_dir_free=lambda: shutil.disk_usage(settings.storage.spool_dir).free,
        spool_min_free=settings.ingest.min_free_bytes,
        destinations=tuple(sorted({d.ae_title for d in settings.destinations()})),
        triton_ready=gateway.triton.is_ready,
        listener_processes=lambda: (
            gateway.listeners.alive(),
            settings.ingest.listener_processes,
        ),
        lease_s=settings.work.lease_s,
    )
    NODE.info({"node": settings.node.name, "version": __version__})
    REGISTRY.register(PipelineCollector(sources))
    # Ingest's metrics, from the listener processes' files (prometheus-client has no
    # annotations for this class).
    MultiProcessCollector(REGISTRY, path=str(gateway.listeners.metrics_dir))  # type: ignore[no-untyped-call]
    server = OpsServer(settings.ops, gateway)
    server.start()
    return server


def _stage_loops(
    settings: Settings,
    store: Store,
    scheduler: JobScheduler,
    exporter: ExportWorker,
    stop: threading.Event,
) -> list[StageLoop]:
    """The gateway's stage loops, not yet started."""
    interval = settings.assembly.poll_interval_s
    stages = [
        StageLoop("inference", scheduler.step, interval, stop),
        StageLoop("export", each_interval(exporter.step), interval, stop),
        StageLoop(
            "lease",
            each_interval(lambda: _keep_the_lease(store, settings)),
            settings.work.beat_interval_s,
            stop,
        ),
    ]
    if settings.notifications.receivers:
        stages.append(
            StageLoop("notify", each_interval(lambda: send_due(store, settings)), interval, stop)
        )
    # A job's results recorded: its slot is free and what it found can go out now.
    for stage in stages:
        scheduler.when_a_job_ends(stage.wake)
    if settings.retention.enabled:
        stages.append(
            StageLoop(
                "retention",
                each_interval(lambda: run_retention(store, settings)),
                settings.retention.interval_s,
                stop,
            )
        )
        stages.append(
            StageLoop(
                "orphans",
                each_interval(lambda: sweep_orphans(store, settings)),
                settings.retention.orphan_sweep_interval_s,
                stop,
            )
        )
    return stages
