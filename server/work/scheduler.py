"""The inference worker: completes quiet series, then starts queued jobs, each run in a
process of its own (``work.job_processes``; else on a thread) and watched by a thread
of its own, as many as ``work`` allows, and records each job's outcome.

What may run at once: ``work.slots`` jobs, of which normal ones take at most
``normal_slots`` (the rest is kept for urgent work, so an urgent series completed
while normal jobs run starts at once), at most ``plugin_slots`` of one plugin, and
jobs whose estimated memory fits ``work.memory_budget`` together (a job over the
budget runs alone; one over the machine's memory fails with that reason). A job
still running at ``work.job_deadline_s`` is failed, its slot freed and its process
killed; on a thread, what it does after that is discarded (the transitions table
refuses done after failed). Any exception from any step of a job fails that job alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from infergate.assembly import complete_quiet_series
from infergate.config import Settings, machine_memory_bytes
from infergate.errors import (
    InfergateError,
    JobProcessError,
    PluginError,
    TritonUnavailableError,
    unexpected,
)
from infergate.inference.endpoints import Endpoints
from infergate.inference.runner import JobInput, JobOutcome, run_job
from infergate.inference.triton import TritonClient
from infergate.logs import get_logger
from infergate.ops.metrics import job_ended
from infergate.plugins import LoadedPlugin, pickling_error
from infergate.store import CriticalFinding, JobRow, ResultRow, Store
from infergate.work.job_process import JobProcess, job_context
from infergate.work.states import JobKind, ResultKind
from infergate.work.warmup import warm

log = get_logger(__name__)


@dataclass
class _Running:
    job: JobRow
    need_bytes: int
    started: float  # monotonic
    # Past its deadline: failed, its slot freed, its process killed (on a thread: the
    # thread not yet returned, its memory still counted).
    abandoned: bool = False
    process: JobProcess | None = None


class JobScheduler:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        plugins: list[LoadedPlugin],
        triton: Endpoints | TritonClient,
    ) -> None:
        self._settings = settings
        self._store = store
        if settings.work.job_processes:
            for loaded in plugins:
                _check_picklable(loaded)
        else:
            warm()  # the jobs run here: pay the first job's costs now
        self._plugins = {p.spec.name: p for p in plugins}
        self._plugin_list = plugins
        # The Triton endpoints jobs are spread over (one client: its one endpoint).
        self._endpoints = triton if isinstance(triton, Endpoints) else Endpoints.of(triton)
        self._lock = threading.Lock()
        self._running: dict[str, _Running] = {}
        self._machine_bytes = machine_memory_bytes()
        # When the listeners took instances again after a start (``accepting``); until
        # then no series completes for being quiet: its senders could not send.
        self._accepting_since: float | None = 0.0
        # Called when a job's outcome is recorded (its slot free, its results ready).
        self._on_job_end: list[Callable[[], None]] = []

    def when_a_job_ends(self, call: Callable[[], None]) -> None:
        """Call ``call`` each time a job's outcome has been recorded: the stages that
        take its results, and this one's loop (its slot is free), need not wait for
        their next round."""
        self._on_job_end.append(call)

    def starting(self) -> None:
        """The gateway starts: the listeners do not take instances yet."""
        self._accepting_since = None

    def accepting(self, since: float) -> None:
        """The listeners take instances again since ``since``: the quiet period of what
        arrived before runs from then (``assembly.completion``)."""
        self._accepting_since = since

    def step(self) -> float | None:
        """One round: complete what is quiet, fail what ran past its deadline, start
        what there is room for. Returns in how many seconds the next receiving series
        completes if nothing more arrives (None: none is receiving)."""
        now = time.time()
        assembled = complete_quiet_series(
            self._store,
            self._plugin_list,
            now,
            self._settings,
            resumed_at=now if self._accepting_since is None else self._accepting_since,
        )
        self._enforce_deadline()
        for job in self._store.runnable_jobs(now):
            verdict = self._room_for(job)
            if verdict == "full":
                break
            if isinstance(verdict, str):  # "later"
                continue
            self._start(job, verdict)
        return None if assembled.next_at is None else assembled.next_at - time.time()

    def running(self) -> list[JobRow]:
        """The jobs holding a slot now."""
        with self._lock:
            return [r.job for r in self._running.values() if not r.abandoned]

    def _room_for(self, job: JobRow) -> int | Literal["full", "later"]:  # noqa: PLR0911 - one return per rule
        """The job's memory need if it may start now; "later" if it must wait while
        others may start; "full" if nothing more may start this round."""
        work = self._settings.work
        with self._lock:
            holding = [r for r in self._running.values() if not r.abandoned]
            used_bytes = sum(r.need_bytes for r in self._running.values())
        if len(holding) >= work.slots:
            return "full"
        if (
            job.priority == "normal"
            and sum(r.job.priority == "normal" for r in holding) >= work.normal_slots
        ):
            return "later"
        if job.kind is JobKind.FORWARD:
            return 0
        if sum(r.job.plugin == job.plugin for r in holding) >= work.plugin_slots:
            return "later"
        need = int(self._store.series_bytes(job.series_uid) * work.memory_per_input_byte)
        if need > self._machine_bytes:
            self._fail(
                job,
                f"the series needs about {need / 2**30:.1f} GiB to process"
                f" (work.memory_per_input_byte), more than this machine's"
                f" {self._machine_bytes / 2**30:.1f} GiB",
            )
            return "later"
        if used_bytes and used_bytes + need > work.memory_budget:
            # It waits for room, and nothing of its priority or below overtakes it,
            # so it runs alone once the jobs before it are done.
            log.info(
                "inference.job.waiting_for_memory",
                job_id=job.job_id,
                need_bytes=need,
                in_use_bytes=used_bytes,
                budget_bytes=work.memory_budget,
            )
            return "full"
        return need

    def _start(self, job: JobRow, need_bytes: int) -> None:
        if not self._store.start_job(job.job_id, time.time(), self._settings.node.name):
            return  # no longer queued
        with self._lock:
            self._running[job.job_id] = _Running(job, need_bytes, time.monotonic())
        thread = threading.Thread(
            target=self._run, args=(job,), name=f"job-{job.job_id[:8]}", daemon=True
        )
        thread.start()

    def _enforce_deadline(self) -> None:
        deadline = self._settings.work.job_deadline_s
        now = time.monotonic()
        with self._lock:
            late = [
                r for r in self._running.values() if not r.abandoned and now - r.started > deadline
            ]
            for running in late:
                running.abandoned = True
        for running in late:
            with job_context(running.job):
                self._fail(
                    running.job,
                    f"the job ran past its deadline of {deadline:g} s (work.job_deadline_s)",
                )
            if running.process is not None:
                running.process.kill()

    def _run(self, job: JobRow) -> None:
        with job_context(job):
            try:
                self._run_contained(job)
            except Exception as exc:  # recording the outcome failed (the store)
                log.error("inference.job.unrecorded", reason=unexpected(exc))
            finally:
                with self._lock:
                    self._running.pop(job.job_id, None)
                for call in self._on_job_end:
                    call()

    def _run_contained(self, job: JobRow) -> None:
        """Run ``job`` and record its outcome; whatever it raises fails it alone."""
        endpoint = self._endpoints.pick() if job.kind is JobKind.INFERENCE else None
        log.info(
            "inference.job.started",
            kind=job.kind.value,
            plugin=job.plugin,
            attempt=job.attempts + 1,
            priority=job.priority,
            **({} if endpoint is None else {"triton": endpoint}),
        )
        try:
            critical: tuple[CriticalFinding, ...] = ()
            peak = 0
            if job.kind is JobKind.FORWARD:
                results, timings = self._forward(job), {}
            else:
                plugin = self._plugins.get(job.plugin)
                if plugin is None:
                    self._fail(job, f"plugin {job.plugin} is not installed")
                    return
                outcome = self._run_inference(job, plugin, endpoint or "")
                results, timings = outcome.results, outcome.timings_s
                critical, peak = outcome.critical, outcome.peak_memory_bytes
        except TritonUnavailableError as exc:
            if endpoint is not None:
                self._endpoints.failed(endpoint, str(exc))
            self._retry_or_fail(job, exc)
            return
        except InfergateError as exc:
            self._fail(job, str(exc), exc)
            return
        except Exception as exc:  # any failure of one job fails that job alone
            self._fail(job, f"the job failed: {unexpected(exc)}", exc)
            return
        receivers = tuple(r.name for r in self._settings.notifications.receivers)
        if not self._store.finish_job(
            job.job_id,
            results,
            time.time(),
            timings,
            critical=critical,
            receivers=receivers,
            node=self._settings.node.name,
        ):
            log.warning(
                "inference.job.discarded",
                plugin=job.plugin,
                reason="the job had been failed meanwhile (its deadline), or another node"
                " took it over; its results are not sent from here",
            )
            return
        log.info(
            "inference.job.done",
            kind=job.kind.value,
            plugin=job.plugin,
            results=[r.kind.value for r in results],
            **timings,
            **({"peak_memory_mib": round(peak / 2**20)} if peak else {}),
        )
        job_ended(job.plugin, "done", timings, peak_memory_bytes=peak)

    def _run_inference(self, job: JobRow, plugin: LoadedPlugin, endpoint: str) -> JobOutcome:
        work = JobInput(
            job=job,
            paths=self._store.instance_paths(job.series_uid),
            supersedes=self._store.superseded_job(job.job_id),
            plugin_rank=sorted(self._plugins).index(plugin.spec.name),
            triton_url=endpoint,
        )
        if not self._settings.work.job_processes:
            return run_job(work, plugin, self._endpoints.client(endpoint), self._settings)
        process = JobProcess(work, plugin, self._settings)
        with self._lock:
            running = self._running.get(job.job_id)
            if running is None or running.abandoned:
                raise JobProcessError("the job had been failed before it started", "Abandoned")
            running.process = process
        return process.run()

    def _forward(self, job: JobRow) -> list[ResultRow]:
        """A series no plugin runs on: its instances, as received, become the job's
        results, which the outbox sends to ``routing.unmatched.destination``."""
        rows = [
            ResultRow(uid, job.job_id, ResultKind.FORWARDED, path)
            for uid, path in self._store.series_instances(job.series_uid)
        ]
        log.info("routing.series.forward_queued", instances=len(rows))
        return rows

    def _fail(self, job: JobRow, reason: str, exc: Exception | None = None) -> None:
        if self._store.fail_job(job.job_id, reason, time.time(), self._settings.node.name):
            error = {} if exc is None else {"error": _error_name(exc)}
            log.error(
                "inference.job.failed",
                job_id=job.job_id,
                plugin=job.plugin,
                reason=reason,
                **error,
            )
            job_ended(job.plugin, "failed")

    def _retry_or_fail(self, job: JobRow, exc: TritonUnavailableError) -> None:
        """Triton could not be reached: try the job again later, with a doubling delay,
        until ``triton.unavailable_attempts`` tries in all."""
        triton = self._settings.triton
        attempt = job.attempts + 1
        if attempt >= triton.unavailable_attempts:
            self._fail(job, f"{exc} (tried {attempt} times)", exc)
            return
        delay = min(triton.retry_delay_s * 2 ** (attempt - 1), triton.max_retry_delay_s)
        now = time.time()
        if self._store.retry_job(job.job_id, str(exc), now + delay, now, self._settings.node.name):
            log.warning(
                "inference.job.retrying",
                plugin=job.plugin,
                attempt=attempt,
                of=triton.unavailable_attempts,
                retry_in_s=round(delay, 1),
                reason=str(exc),
            )

    def release_running(self, wait_s: float) -> list[str]:
        """On an orderly stop: wait up to ``wait_s`` for the jobs in flight, then put
        back in the queue those still running (not counted as interrupted: nothing
        died); returns their ids."""
        deadline = time.monotonic() + wait_s
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        ids = [job.job_id for job in self.running()]
        if ids:
            self._store.requeue_jobs(ids, time.time(), self._settings.node.name)
            log.warning("inference.jobs.requeued_at_stop", jobs=ids)
        with self._lock:
            processes = [r.process for r in self._running.values() if r.process is not None]
        for process in processes:
            process.kill()
        return ids


def _error_name(exc: Exception) -> str:
    """The type of what failed the job; for a job in its own process, what it raised
    there."""
    return exc.error if isinstance(exc, JobProcessError) else type(exc).__name__


def _check_picklable(loaded: LoadedPlugin) -> None:
    """A plugin goes to each job's process pickled: refuse at start one that cannot."""
    error = pickling_error(loaded)
    if error is not None:
        raise PluginError(
            f"plugin {loaded.spec.name} cannot be sent to a job process ({type(error).__name__});"
            " make its object picklable or set work.job_processes: false"
        ) from error
