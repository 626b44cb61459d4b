"""Assembly: deciding that a series is complete, and handing it to routing.

A series is complete when no instance has arrived for the quiet period; sooner when
its sender released the association and no other association is still sending it
(an optional hint); and at the latest when it has been receiving for the maximum
series age. With ``assembly.scope: study`` the series of a study complete together,
judged on the study as a whole. The clocks are the state store's, so a restart
resumes where the dead process stopped. Nothing here reads pixel data.
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from pydicom.errors import InvalidDicomError

from infergate.config import AssemblySettings, Settings
from infergate.logs import get_logger
from infergate.ops.metrics import series_completed
from infergate.plugins import LoadedPlugin
from infergate.routing.decide import route
from infergate.routing.facts import SeriesFacts, read_series_facts
from infergate.store import NewJob, SeriesRow, Store
from infergate.work.states import JobKind

log = get_logger(__name__)


def completion(
    group: Sequence[SeriesRow],
    now: float,
    settings: AssemblySettings,
    resumed_at: float = 0.0,
) -> str | None:
    """Why ``group`` (one series, or the receiving series of one study) is complete
    now: ``"quiet"``, ``"released"`` or ``"max_age"``; None while it is not.

    The quiet period of a series whose last instance came before ``resumed_at`` (when
    the gateway's listeners took instances again after a start) runs from then: while
    the gateway was down its senders could not send, so an outage longer than the
    quiet period does not complete a series its sender will go on with."""
    return next(
        (trigger for trigger, at in _deadlines(group, settings, resumed_at) if now >= at), None
    )


def completes_at(
    group: Sequence[SeriesRow], settings: AssemblySettings, resumed_at: float = 0.0
) -> float:
    """When ``group`` will be complete if nothing more arrives (see :func:`completion`)."""
    return min(at for _, at in _deadlines(group, settings, resumed_at))


def _deadlines(
    group: Sequence[SeriesRow], settings: AssemblySettings, resumed_at: float
) -> list[tuple[str, float]]:
    """Each way ``group`` may complete and the time it does, in the order that
    :func:`completion` names them when several hold."""
    last = max([*(s.last_received_at for s in group), resumed_at])
    deadlines = [("quiet", last + settings.quiet_period_s)]
    hint = settings.release_quiet_period_s
    # The hint holds when every sender released after its last instance, none is
    # still sending, and nothing arrived for the shorter quiet time since.
    released = [
        s.released_at
        for s in group
        if s.released_at is not None and s.released_at >= s.last_received_at
    ]
    if hint is not None and len(released) == len(group) and not any(s.open_senders for s in group):
        deadlines.append(("released", max(released) + hint))
    age = settings.max_series_age_s
    if age is not None:
        deadlines.append(("max_age", min(s.first_received_at for s in group) + age))
    return deadlines


@dataclass(frozen=True)
class Assembled:
    """One round of assembly: the jobs it created, and when the next receiving series
    will be complete if nothing more arrives (None: none is receiving)."""

    jobs: list[str]
    next_at: float | None


def complete_quiet_series(
    store: Store,
    plugins: list[LoadedPlugin],
    now: float,
    settings: Settings,
    resumed_at: float = 0.0,
) -> Assembled:
    """Close every complete series and create its jobs.
    ``resumed_at``: when this gateway's listeners took instances again (see
    :func:`completion`)."""
    receiving = store.receiving_series()
    if settings.assembly.scope == "study":
        by_study: dict[str, list[SeriesRow]] = defaultdict(list)
        for series in receiving:
            by_study[series.study_uid].append(series)
        groups = list(by_study.values())
    else:
        groups = [[series] for series in receiving]
    created: list[str] = []
    waiting: list[float] = []
    for group in groups:
        trigger = completion(group, now, settings.assembly, resumed_at)
        if trigger is None:
            waiting.append(completes_at(group, settings.assembly, resumed_at))
            continue
        outcomes = [
            _complete(store, plugins, s, now=now, settings=settings, trigger=trigger) for s in group
        ]
        completed = [outcome for outcome in outcomes if outcome is not None]
        if settings.assembly.scope == "study" and completed:
            log.info(
                "assembly.study.complete",
                study_uid=group[0].study_uid,
                series=len(completed),
                trigger=trigger,
            )
        for jobs in completed:
            created.extend(jobs)
        if len(completed) < len(group):  # an instance arrived meanwhile: decide again soon
            waiting.append(now)
    return Assembled(created, min(waiting, default=None))


def _complete(
    store: Store,
    plugins: list[LoadedPlugin],
    series: SeriesRow,
    *,
    now: float,
    settings: Settings,
    trigger: str,
) -> list[str] | None:
    """Complete ``series`` and create its jobs: their ids, or None when an instance
    arrived meanwhile (the next round decides again)."""
    facts = _facts(store, series)
    enabled = settings.ingest.called_ae(series.called_ae).plugins
    decisions = route(
        facts,
        plugins,
        settings.routing.rules,
        None if enabled is None else frozenset(enabled),
    )
    explained = [
        {
            "plugin": d.plugin,
            "matched": d.matched,
            "reason": d.reason,
            "priority": d.priority,
            "rules": {rule: list(lines) for rule, lines in d.explanation},
        }
        for d in decisions
    ]
    why = json.dumps({"trigger": trigger, "decisions": explained})
    jobs = [
        NewJob(uuid.uuid4().hex, JobKind.INFERENCE, plugin=d.plugin, priority=d.priority, route=why)
        for d in decisions
        if d.matched
    ]
    unmatched = settings.routing.unmatched
    if not jobs and unmatched.action == "forward":
        # A job like any other, so a crash between completion and delivery loses nothing.
        jobs = [NewJob(uuid.uuid4().hex, JobKind.FORWARD, route=why)]
    with structlog.contextvars.bound_contextvars(
        series_uid=series.series_uid, study_uid=series.study_uid
    ):
        if not store.complete_series(series, jobs, now):
            return None
        series_completed(trigger, now - series.last_received_at, [job.plugin for job in jobs])
        log.info(
            "assembly.series.complete",
            instances=series.instance_count,
            modality=series.modality,
            trigger=trigger,
            quiet_s=round(now - series.last_received_at, 2),
            generation=series.generation,
        )
        log.info(
            "routing.series.routed",
            plugins=[job.plugin for job in jobs if job.kind is JobKind.INFERENCE],
            forward=any(job.kind is JobKind.FORWARD for job in jobs),
            decisions=explained,
        )
        if not any(d.matched for d in decisions):
            destination = unmatched.destination
            log.info(
                "routing.series.unmatched",
                modality=series.modality,
                action=unmatched.action,
                destination=None if destination is None else destination.ae_title,
            )
    return [job.job_id for job in jobs]


def _facts(store: Store, series: SeriesRow) -> SeriesFacts:
    """What routing may look at, from the headers of the series' spooled instances; if
    they cannot be read, what the state store knows (routing then sees no more)."""
    try:
        return read_series_facts(
            store.instance_paths(series.series_uid), series.calling_ae, series.called_ae
        )
    except (OSError, InvalidDicomError, ValueError, IndexError) as exc:
        log.warning("routing.series.unreadable", reason=f"{type(exc).__name__}: {exc}")
        return SeriesFacts(
            modality=series.modality,
            sop_class_uid="",
            body_part="",
            series_description="",
            image_type=(),
            orientation="unknown",
            slices=series.instance_count,
            slice_thickness_mm=None,
            regular_spacing=False,
            calling_ae=series.calling_ae,
            called_ae=series.called_ae,
        )
