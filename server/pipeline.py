"""The worker: assembly, jobs and export, one step after another, off the DICOM threads.

Every step reads its work from the state store and records its outcome there, so
a process that dies anywhere resumes from the store: jobs left running run again
(with the same result UIDs), results not yet delivered are delivered.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field

import structlog

from infergate.config import Destination, Settings
from infergate.dicom.assembly import complete_quiet_series
from infergate.dicom.scu import send_files
from infergate.errors import InfergateError, TritonUnavailableError
from infergate.inference.runner import run_job
from infergate.inference.triton import TritonClient
from infergate.logs import get_logger
from infergate.plugins import LoadedPlugin
from infergate.routing import FORWARD_JOB
from infergate.store import JobRow, ResultRow, Store

log = get_logger(__name__)
# The kind of a result row that is a received instance forwarded as it came.
FORWARDED = "forwarded"


@dataclass
class Pipeline:
    settings: Settings
    store: Store
    plugins: list[LoadedPlugin]
    triton: TritonClient
    _next_export_at: dict[str, float] = field(default_factory=dict)

    def recover(self) -> None:
        """Put back what a dead process left half done."""
        requeued = self.store.recover(time.time())
        if requeued:
            log.warning("pipeline.recovered", jobs_requeued=requeued)

    def run(self, stop: threading.Event) -> None:
        """Work until ``stop`` is set."""
        log.info("pipeline.started")
        while not stop.is_set():
            try:
                self.step(stop)
            except InfergateError as exc:  # e.g. the store failed; try again next tick
                log.error("pipeline.step.failed", error=type(exc).__name__, reason=str(exc))
            stop.wait(self.settings.assembly.poll_interval_s)
        log.info("pipeline.stopped")

    def step(self, stop: threading.Event | None = None) -> None:
        """Complete quiet series, then run jobs one at a time until none is left (or
        ``stop``), choosing the next only when the last is done: a series completed
        meanwhile that routing made urgent goes before the normal jobs still queued,
        and each job's results are sent before the next job starts."""
        complete_quiet_series(self.store, self.plugins, time.time(), self.settings)
        while (stop is None or not stop.is_set()) and (job := self.store.next_job()) is not None:
            self._run_one(job)
            self.export()
            complete_quiet_series(self.store, self.plugins, time.time(), self.settings)
        self.export()

    def _run_one(self, job: JobRow) -> None:
        plugin = next((p for p in self.plugins if p.spec.name == job.plugin), None)
        with structlog.contextvars.bound_contextvars(
            job_id=job.job_id, series_uid=job.series_uid, study_uid=job.study_uid
        ):
            if job.plugin == FORWARD_JOB:
                self._queue_forward(job)
                return
            if plugin is None:
                self._fail(job, None, f"plugin {job.plugin} is not installed")
                return
            self.store.start_job(job.job_id, time.time())
            log.info(
                "inference.job.started",
                plugin=job.plugin,
                attempt=job.attempts + 1,
                priority=job.priority,
            )
            try:
                outcome = run_job(job, self.store, plugin, self.triton, self.settings)
            except TritonUnavailableError as exc:
                self._retry_or_fail(job, exc)
                return
            except InfergateError as exc:
                self._fail(job, exc, str(exc))
                return
            self.store.finish_job(job.job_id, outcome.results, time.time())
            log.info(
                "inference.job.done",
                plugin=job.plugin,
                results=[r.kind for r in outcome.results],
                **outcome.timings_s,
            )

    def _fail(self, job: JobRow, exc: InfergateError | None, reason: str) -> None:
        self.store.fail_job(job.job_id, reason, time.time())
        error = {} if exc is None else {"error": type(exc).__name__}
        log.error("inference.job.failed", plugin=job.plugin, reason=reason, **error)

    def _retry_or_fail(self, job: JobRow, exc: TritonUnavailableError) -> None:
        """Triton could not be reached: try the job again later, with a doubling delay,
        until ``triton.unavailable_attempts`` tries in all."""
        triton = self.settings.triton
        attempt = job.attempts + 1
        if attempt >= triton.unavailable_attempts:
            self._fail(job, exc, f"{exc} (tried {attempt} times)")
            return
        delay = min(triton.retry_delay_s * 2 ** (attempt - 1), triton.max_retry_delay_s)
        now = time.time()
        self.store.retry_job(job.job_id, str(exc), now + delay, now)
        log.warning(
            "inference.job.retrying",
            plugin=job.plugin,
            attempt=attempt,
            of=triton.unavailable_attempts,
            retry_in_s=round(delay, 1),
            reason=str(exc),
        )

    def _queue_forward(self, job: JobRow) -> None:
        """A series no plugin runs on: its instances, as received, become the job's
        results, which export sends to ``routing.unmatched.destination``."""
        self.store.start_job(job.job_id, time.time())
        rows = [
            ResultRow(uid, job.job_id, FORWARDED, path, "pending", 0)
            for uid, path in self.store.series_instances(job.series_uid)
        ]
        self.store.finish_job(job.job_id, rows, time.time())
        log.info("routing.series.forward_queued", instances=len(rows))

    def _destination(self, job_id: str, called_ae: str) -> Destination | None:
        if self.store.job(job_id).plugin == FORWARD_JOB:
            return self.settings.routing.unmatched.destination
        return self.settings.destination_for(called_ae)

    def export(self) -> None:
        pending = self.store.pending_results()
        if not pending:
            return
        by_job: dict[str, list[ResultRow]] = defaultdict(list)
        for row in pending:
            by_job[row.job_id].append(row)
        now = time.time()
        for job_id, rows in by_job.items():
            with structlog.contextvars.bound_contextvars(job_id=job_id):
                # The series' called AE title picks the destination, and is the title
                # Infergate calls it with.
                called_ae = self.store.called_ae_of_job(job_id)
                destination = self._destination(job_id, called_ae)
                if destination is None:
                    self.store.mark_results_attempted(
                        [r.sop_instance_uid for r in rows], "no destination configured", True
                    )
                    log.warning(
                        "export.skipped",
                        reason=f"no destination for called AE title {called_ae}"
                        " (export.destination, ingest.called_aes); results stay on disk",
                        paths=[str(r.path) for r in rows],
                    )
                    continue
                if self._next_export_at.get(job_id, 0.0) > now:
                    continue
                self._send(job_id, rows, destination, called_ae)

    def _send(
        self, job_id: str, rows: list[ResultRow], destination: Destination, calling_ae: str
    ) -> None:
        export = self.settings.export
        uids = [r.sop_instance_uid for r in rows]
        attempt = max(r.attempts for r in rows) + 1
        started = time.perf_counter()
        urgent = any(r.priority == "urgent" for r in rows)
        try:
            send_files(
                [r.path for r in rows], destination, calling_ae, export.timeout_s, urgent=urgent
            )
        except InfergateError as exc:
            give_up = attempt >= export.attempts
            self.store.mark_results_attempted(uids, str(exc), give_up)
            self._next_export_at[job_id] = time.time() + export.retry_delay_s
            log.error(
                "export.failed" if give_up else "export.retrying",
                attempt=attempt,
                of=export.attempts,
                reason=str(exc),
                destination=destination.ae_title,
            )
            return
        self.store.mark_results_sent(uids, time.time())
        self._next_export_at.pop(job_id, None)
        log.info(
            "export.sent",
            destination=destination.ae_title,
            calling_ae=calling_ae,
            kinds=[r.kind for r in rows],
            priority="urgent" if urgent else "normal",
            sop_instance_uids=uids,
            attempt=attempt,
            duration_s=round(time.perf_counter() - started, 3),
        )
