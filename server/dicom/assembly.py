"""Assembly: deciding that a series is complete, and handing it to routing.

A series is complete when no instance has arrived for the quiet period. The
clock is the state store's ``last_received_at``, so a restart resumes where the
dead process stopped. Nothing here reads pixel data.
"""

from __future__ import annotations

import uuid

import structlog

from infergate.logs import get_logger
from infergate.plugins import LoadedPlugin
from infergate.routing import SeriesHeader, route
from infergate.store import NewJob, SeriesRow, Store

log = get_logger(__name__)


def is_complete(series: SeriesRow, now: float, quiet_period_s: float) -> bool:
    """True when the series has been quiet for at least ``quiet_period_s``."""
    return now - series.last_received_at >= quiet_period_s


def complete_quiet_series(
    store: Store, plugins: list[LoadedPlugin], now: float, quiet_period_s: float
) -> list[str]:
    """Close every quiet series and create its jobs; returns the new job ids."""
    created: list[str] = []
    for series in store.receiving_series():
        if not is_complete(series, now, quiet_period_s):
            continue
        header = SeriesHeader(
            modality=series.modality,
            calling_ae=series.calling_ae,
            called_ae=series.called_ae,
            instance_count=series.instance_count,
        )
        decisions = route(header, plugins)
        jobs = [NewJob(job_id=uuid.uuid4().hex, plugin=d.plugin) for d in decisions if d.matched]
        with structlog.contextvars.bound_contextvars(
            series_uid=series.series_uid, study_uid=series.study_uid
        ):
            if not store.complete_series(series, jobs, now):
                continue  # an instance arrived meanwhile; decide again later
            log.info(
                "assembly.series.complete",
                instances=series.instance_count,
                modality=series.modality,
                quiet_s=round(now - series.last_received_at, 2),
                generation=series.generation,
            )
            log.info(
                "routing.series.routed",
                plugins=[d.plugin for d in decisions if d.matched],
                decisions=[
                    {"plugin": d.plugin, "matched": d.matched, "reason": d.reason}
                    for d in decisions
                ],
            )
            if not jobs:
                log.info("routing.series.unmatched", modality=series.modality)
        created.extend(job.job_id for job in jobs)
    return created
