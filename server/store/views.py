"""What an operator sees of the pipeline (the admin API, ``infergate jobs``, the status
page): jobs with their stage times and route, deliveries with each object's outcome,
studies, and the last hours' throughput. Read-only; UIDs, AE titles, states, times and
reasons, nothing from a patient's data (the store holds none).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from infergate.config import Destination
from infergate.errors import NotFoundError
from infergate.store.outbox import OutboxRecords
from infergate.work.states import PRIORITY_OF_RANK, JobState

_JOB_VIEW = (
    "SELECT j.job_id, j.kind, j.plugin, j.state, j.priority, j.attempts, j.interruptions,"
    " j.error, j.study_uid, j.series_uid, s.modality, s.instance_count, s.called_ae,"
    " s.first_received_at, s.last_received_at, j.created_at, j.started_at, j.updated_at,"
    " j.timings, j.route, j.node FROM jobs j JOIN series s ON s.series_uid = j.series_uid"
)
_DELIVERY_VIEW = (
    "SELECT delivery_id, study_uid, destination_ae, destination_host, destination_port,"
    " calling_ae, state, priority, attempts, created_at, first_attempt_at, finished_at,"
    " outcome, reason, replayed_to FROM deliveries"
)


@dataclass(frozen=True)
class JobView:
    job_id: str
    kind: str
    plugin: str
    state: str
    priority: str
    attempts: int
    interruptions: int
    error: str | None
    study_uid: str
    series_uid: str
    modality: str
    instances: int
    called_ae: str
    first_received_at: float
    last_received_at: float
    completed_at: float  # its series was found complete and the job made
    started_at: float | None
    updated_at: float
    timings_s: dict[str, float] = field(default_factory=dict)  # a done job's stages
    node: str | None = None  # the gateway node that started its latest attempt


@dataclass(frozen=True)
class ObjectView:
    sop_instance_uid: str
    kind: str
    state: str
    status: int | None = None  # the destination's C-STORE status, when it answered
    reason: str | None = None


@dataclass(frozen=True)
class DeliveryView:
    delivery_id: str
    study_uid: str
    destination: str  # AE title at host:port
    calling_ae: str
    state: str
    priority: str
    attempts: int
    created_at: float
    first_attempt_at: float | None
    finished_at: float | None
    outcome: str | None
    reason: str | None
    replayed_to: str | None
    objects: tuple[ObjectView, ...] = ()


@dataclass(frozen=True)
class JobDetail:
    job: JobView
    route: dict[str, Any] | None  # routing's decisions and the completion trigger
    results: tuple[ObjectView, ...]
    deliveries: tuple[DeliveryView, ...]


@dataclass(frozen=True)
class StudyView:
    study_uid: str
    first_received_at: float
    last_received_at: float
    series: int
    instances: int
    jobs: dict[str, int]  # by state
    results: dict[str, int]  # by state: pending, delivered, dead, kept
    deliveries: dict[str, int]  # by state, replayed dead letters not counted


@dataclass(frozen=True)
class DestinationView:
    """One destination as its deliveries show it."""

    destination: str  # AE title at host:port
    open: int  # deliveries pending, sending or waiting to retry
    oldest_open_at: float | None  # when the oldest open one was made
    dead: int  # dead letters not replayed
    last_delivered_at: float | None
    last_outcome: str | None  # of the latest attempt that ended
    last_reason: str | None


@dataclass(frozen=True)
class HourView:
    """One hour of the last hours: jobs done, their latency from the series' last
    instance to their results written, and deliveries ended."""

    hour_start: float
    jobs_done: int
    jobs_failed: int
    mean_latency_s: float | None
    deliveries_delivered: int


class ViewRecords(OutboxRecords):
    def job_views(
        self,
        *,
        state: JobState | None = None,
        plugin: str | None = None,
        since: float | None = None,
        study_uid: str | None = None,
        limit: int = 100,
    ) -> list[JobView]:
        """Jobs, the latest first; ``since``: changed at or after that time."""
        conditions, parameters = ["1 = 1"], []
        for condition, value in (
            ("j.state = ?", None if state is None else state.value),
            ("j.plugin = ?", plugin),
            ("j.updated_at >= ?", since),
            ("j.study_uid = ?", study_uid),
        ):
            if value is not None:
                conditions.append(condition)
                parameters.append(value)
        rows = self._rows(
            f"{_JOB_VIEW} WHERE {' AND '.join(conditions)} ORDER BY j.created_at DESC LIMIT ?",
            (*parameters, limit),
        )
        return [_job_view(row) for row in rows]

    def job_detail(self, job_id: str) -> JobDetail:
        rows = self._rows(f"{_JOB_VIEW} WHERE j.job_id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no job {job_id} in the state store")
        *_, route, _node = rows[0]
        results = self._rows(
            "SELECT sop_instance_uid, kind FROM results WHERE job_id = ? ORDER BY kind",
            (job_id,),
        )
        states = self.result_states(job_id=job_id)
        delivery_ids = [
            str(delivery_id)
            for (delivery_id,) in self._rows(
                "SELECT DISTINCT d.delivery_id FROM delivery_items d JOIN results r"
                " ON r.sop_instance_uid = d.sop_instance_uid WHERE r.job_id = ?",
                (job_id,),
            )
        ]
        return JobDetail(
            job=_job_view(rows[0]),
            route=None if route is None else json.loads(route),
            results=tuple(ObjectView(uid, kind, states[uid].value) for uid, kind in results),
            deliveries=tuple(self.delivery_view(d) for d in delivery_ids),
        )

    def delivery_view(self, delivery_id: str) -> DeliveryView:
        rows = self._rows(f"{_DELIVERY_VIEW} WHERE delivery_id = ?", (delivery_id,))
        if not rows:
            raise NotFoundError(f"no delivery {delivery_id} in the state store")
        return self._delivery_view(rows[0])

    def delivery_views(self, *, dead_only: bool = False, limit: int = 100) -> list[DeliveryView]:
        """Deliveries, the latest first; ``dead_only``: the dead letters not replayed."""
        condition = "state = 'dead' AND replayed_to IS NULL" if dead_only else "1 = 1"
        rows = self._rows(
            f"{_DELIVERY_VIEW} WHERE {condition} ORDER BY created_at DESC LIMIT ?",
            (limit,),
        )
        return [self._delivery_view(row) for row in rows]

    def study_views(self, limit: int = 50) -> list[StudyView]:
        """Studies, the latest received first: what arrived, ran and was delivered."""
        studies = self._rows(
            "SELECT study_uid, MIN(first_received_at), MAX(last_received_at), COUNT(*),"
            " SUM(instance_count) FROM series GROUP BY study_uid"
            " ORDER BY MAX(last_received_at) DESC LIMIT ?",
            (limit,),
        )
        views = []
        for study_uid, first, last, series, instances in studies:
            jobs = self._rows(
                "SELECT state, COUNT(*) FROM jobs WHERE study_uid = ? GROUP BY state",
                (study_uid,),
            )
            deliveries = self._rows(
                "SELECT state, COUNT(*) FROM deliveries WHERE study_uid = ?"
                " AND replayed_to IS NULL GROUP BY state",
                (study_uid,),
            )
            result_counts: dict[str, int] = {}
            for state in self.result_states(study_uid=study_uid).values():
                result_counts[state.value] = result_counts.get(state.value, 0) + 1
            views.append(
                StudyView(
                    study_uid,
                    first,
                    last,
                    series,
                    instances,
                    dict(jobs),
                    result_counts,
                    dict(deliveries),
                )
            )
        return views

    def destination_views(self) -> list[DestinationView]:
        """Every destination deliveries went or go to, by AE title, host and port."""
        rows = self._rows(
            "SELECT destination_ae, destination_host, destination_port,"
            " COUNT(CASE WHEN state IN ('pending', 'sending', 'retry_wait') THEN 1 END),"
            " MIN(CASE WHEN state IN ('pending', 'sending', 'retry_wait') THEN created_at END),"
            " COUNT(CASE WHEN state = 'dead' AND replayed_to IS NULL THEN 1 END),"
            " MAX(CASE WHEN state = 'delivered' THEN finished_at END)"
            " FROM deliveries GROUP BY destination_ae, destination_host, destination_port"
            " ORDER BY destination_ae"
        )
        views = []
        for ae_title, host, port, open_count, oldest, dead, delivered_at in rows:
            last = self._rows(
                "SELECT outcome, reason FROM deliveries WHERE destination_ae = ?"
                " AND destination_host = ? AND destination_port = ? AND outcome IS NOT NULL"
                " ORDER BY updated_at DESC LIMIT 1",
                (ae_title, host, port),
            )
            outcome, reason = last[0] if last else (None, None)
            views.append(
                DestinationView(
                    Destination(ae_title=ae_title, host=host, port=port).described,
                    open_count,
                    oldest,
                    dead,
                    delivered_at,
                    outcome,
                    reason,
                )
            )
        return views

    def hourly(self, now: float, hours: int) -> list[HourView]:
        """The last ``hours`` whole and current hours, the oldest first."""
        first = (now // 3600 - (hours - 1)) * 3600
        ended = self._rows(
            "SELECT j.state, j.updated_at, j.updated_at - s.last_received_at FROM jobs j"
            " JOIN series s ON s.series_uid = j.series_uid"
            " WHERE j.state IN (?, ?, ?) AND j.updated_at >= ?",
            (JobState.DONE.value, JobState.FAILED.value, JobState.DEAD.value, first),
        )
        delivered = self._rows(
            "SELECT finished_at FROM deliveries WHERE state = 'delivered' AND finished_at >= ?",
            (first,),
        )
        views = []
        for index in range(hours):
            start = first + index * 3600
            done = [
                latency
                for state, at, latency in ended
                if state == JobState.DONE.value and start <= at < start + 3600
            ]
            failed = sum(
                1
                for state, at, _ in ended
                if state != JobState.DONE.value and start <= at < start + 3600
            )
            views.append(
                HourView(
                    start,
                    len(done),
                    failed,
                    sum(done) / len(done) if done else None,
                    sum(1 for (at,) in delivered if start <= at < start + 3600),
                )
            )
        return views

    def _delivery_view(self, row: tuple[Any, ...]) -> DeliveryView:
        delivery_id, study_uid, ae_title, host, port, calling_ae, state, rank, *rest = row
        attempts, created_at, first_attempt_at, finished_at, outcome, reason, replayed_to = rest
        objects = self._rows(
            "SELECT d.sop_instance_uid, r.kind, d.state, d.status, d.reason"
            " FROM delivery_items d JOIN results r ON r.sop_instance_uid = d.sop_instance_uid"
            " WHERE d.delivery_id = ? ORDER BY r.kind",
            (delivery_id,),
        )
        return DeliveryView(
            delivery_id,
            study_uid,
            Destination(ae_title=ae_title, host=host, port=port).described,
            calling_ae,
            state,
            PRIORITY_OF_RANK[rank],
            attempts,
            created_at,
            first_attempt_at,
            finished_at,
            outcome,
            reason,
            replayed_to,
            tuple(ObjectView(*o) for o in objects),
        )


def _job_view(row: tuple[Any, ...]) -> JobView:
    job_id, kind, plugin, state, rank, attempts, interruptions, error, *rest = row
    study_uid, series_uid, modality, instances, called_ae, *times, timings, _route, node = rest
    first_received_at, last_received_at, completed_at, started_at, updated_at = times
    return JobView(
        job_id=job_id,
        kind=kind,
        plugin=plugin,
        state=state,
        priority=PRIORITY_OF_RANK[rank],
        attempts=attempts,
        interruptions=interruptions,
        error=error,
        study_uid=study_uid,
        series_uid=series_uid,
        modality=modality,
        instances=instances,
        called_ae=called_ae,
        first_received_at=first_received_at,
        last_received_at=last_received_at,
        completed_at=completed_at,
        started_at=started_at,
        updated_at=updated_at,
        timings_s=json.loads(timings) if timings else {},
        node=node,
    )
