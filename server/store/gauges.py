"""What the store says of the pipeline at this moment, for the ops endpoint's gauges:
counts by state and priority, the oldest undelivered result, dead letters. Counts and
ages only: no UID, no patient data."""

from __future__ import annotations

from dataclasses import dataclass

from infergate.store.db import Database
from infergate.work.states import (
    PRIORITY_OF_RANK,
    DeliveryState,
    JobState,
    NotificationState,
    Priority,
    ResultState,
)


@dataclass(frozen=True)
class PipelineGauges:
    # (job state, priority) -> jobs, for the jobs not yet ended
    jobs_waiting: dict[tuple[str, Priority], int]
    # (delivery state, destination AE title) -> deliveries not yet ended
    deliveries_open: dict[tuple[str, str], int]
    # When the oldest result not yet delivered (nor kept, nor dead) was made; None: none
    oldest_undelivered_at: float | None
    dead_jobs: int
    dead_deliveries: int
    dead_objects: int
    dead_notifications: int = 0


class GaugeRecords(Database):
    def pipeline_gauges(self) -> PipelineGauges:
        waiting = self._rows(
            "SELECT state, priority, COUNT(*) FROM jobs WHERE state IN (?, ?)"
            " GROUP BY state, priority",
            (JobState.QUEUED.value, JobState.RUNNING.value),
        )
        open_deliveries = self._rows(
            "SELECT state, destination_ae, COUNT(*) FROM deliveries WHERE state IN (?, ?, ?)"
            " GROUP BY state, destination_ae",
            (
                DeliveryState.PENDING.value,
                DeliveryState.SENDING.value,
                DeliveryState.RETRY_WAIT.value,
            ),
        )
        oldest, dead_jobs, dead_deliveries, dead_objects, dead_notifications = self._rows(
            "SELECT (SELECT MIN(r.created_at) FROM results r WHERE r.kept_reason IS NULL"
            " AND COALESCE((SELECT d.state FROM delivery_items d JOIN deliveries v"
            " ON v.delivery_id = d.delivery_id WHERE d.sop_instance_uid = r.sop_instance_uid"
            " ORDER BY v.created_at DESC LIMIT 1), ?) = ?),"
            " (SELECT COUNT(*) FROM jobs WHERE state = ?),"
            " (SELECT COUNT(*) FROM deliveries WHERE state = ? AND replayed_to IS NULL),"
            " (SELECT COUNT(*) FROM delivery_items i JOIN deliveries v"
            " ON v.delivery_id = i.delivery_id WHERE i.state = ? AND v.replayed_to IS NULL),"
            " (SELECT COUNT(*) FROM notifications WHERE state = ?)",
            (
                ResultState.PENDING.value,
                ResultState.PENDING.value,
                JobState.DEAD.value,
                DeliveryState.DEAD.value,
                ResultState.DEAD.value,
                NotificationState.DEAD.value,
            ),
        )[0]
        return PipelineGauges(
            jobs_waiting={(state, PRIORITY_OF_RANK[rank]): count for state, rank, count in waiting},
            deliveries_open={(state, ae): count for state, ae, count in open_deliveries},
            oldest_undelivered_at=oldest,
            dead_jobs=dead_jobs,
            dead_deliveries=dead_deliveries,
            dead_objects=dead_objects,
            dead_notifications=dead_notifications,
        )

    def check_writable(self) -> None:
        """Take the write lock and let it go: raises StoreError when the store cannot
        be written (read-only, locked past its timeout, its disk gone)."""
        with self._transaction():
            pass
