"""An inference job in a process of its own, forked from a warm forkserver.

Why a process, not a thread of the gateway: the job's own work in the gateway (volume
building, the plugin's steps, SEG and SR encoding) holds the GIL, so two jobs on
threads take as long as the two in turn (tests/benchmarks/bench_gil.py: 2.59 s
against 2.48 s in turn, 1.45 s on two processes, 100 slices on 2 cores). A process
can also be killed: a job past its deadline stops for real and gives back its memory,
and a job that crashes its interpreter (a segfault in a plugin's native code, the OOM
killer) fails alone.

Each job is forked from a forkserver that imported the job's modules and read
highdicom's tables once (``work.job_processes: false`` runs jobs on threads instead).
The child reads nothing from the store: the gateway passes the instance paths; the
child writes the result files and sends back their rows, which the gateway commits.
It dies with the forkserver, which ends when the gateway does.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import resource
import signal
import threading
from dataclasses import dataclass, replace
from typing import Any

import structlog

from infergate.config import Settings
from infergate.errors import InfergateError, JobProcessError, TritonUnavailableError, unexpected
from infergate.inference.runner import JobInput, JobOutcome, run_job
from infergate.inference.triton import TritonClient
from infergate.lifetime import JOB_NICENESS, die_with_parent
from infergate.logs import configure_logging, get_logger
from infergate.plugins import LoadedPlugin
from infergate.store import JobRow
from infergate.work.forkserver import context

log = get_logger(__name__)

# The job process has this long to exit after it sent its outcome.
_EXIT_WAIT_S = 30.0


@dataclass(frozen=True)
class _Failure:
    """What the child sends back when its job failed: the reason and the exception's
    type, never its message unless Infergate raised it on purpose."""

    reason: str
    error: str
    triton_unavailable: bool = False


class JobProcess:
    """One job's process: :meth:`run` starts it and waits for its outcome; :meth:`kill`
    (from another thread) stops it at once."""

    def __init__(self, work: JobInput, plugin: LoadedPlugin, settings: Settings) -> None:
        self._context = context()
        self._arguments = (work, plugin, settings.for_child_process())
        self._process: Any = None
        self._killed = False
        self._lock = threading.Lock()  # a kill and the start do not cross

    def run(self) -> JobOutcome:
        """The job's outcome; raises what the job's failure calls for:
        :class:`TritonUnavailableError` (Triton could not be reached: retry),
        :class:`JobProcessError` (the job failed, or its process died)."""
        reader, writer = self._context.Pipe(duplex=False)
        process = self._context.Process(
            target=_child,
            args=(*self._arguments, writer),
            name="infergate-job",
            daemon=True,
        )
        try:
            with self._lock:
                if self._killed:
                    raise JobProcessError(_death(None, killed=True), "JobProcessDied")
                self._process = process
                process.start()
            writer.close()
            log.info("inference.job.process", pid=process.pid)
            message: object = None
            ready = multiprocessing.connection.wait([reader, process.sentinel])
            if reader in ready:
                try:
                    message = reader.recv()
                except EOFError:  # it died before it could answer
                    message = None
            process.join(_EXIT_WAIT_S)
            if process.is_alive():
                process.kill()
                process.join()
        finally:
            reader.close()
            writer.close()  # a second close does nothing
        if isinstance(message, JobOutcome):
            return message
        if isinstance(message, _Failure):
            if message.triton_unavailable:
                raise TritonUnavailableError(message.reason)
            raise JobProcessError(message.reason, message.error)
        raise JobProcessError(_death(process.exitcode, self._killed), "JobProcessDied")

    def kill(self) -> None:
        """SIGKILL the job's process (its deadline passed, or the gateway stops)."""
        with self._lock:
            self._killed = True
            if self._process is not None and self._process.is_alive():
                self._process.kill()


def _death(exitcode: int | None, killed: bool) -> str:
    if killed:
        return "the job's process was stopped"
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        return f"the job's process died of {name} before it answered"
    return f"the job's process exited with code {exitcode} before it answered"


def _child(
    work: JobInput,
    plugin: LoadedPlugin,
    settings_json: str,
    answer: multiprocessing.connection.Connection,
) -> None:
    """The job process: run the job, send its outcome or its failure, exit."""
    die_with_parent(os.getppid())()  # the forkserver, which ends with the gateway
    # Below the listeners and Triton: ingest and the model (the slowest stage) get
    # the cores first when jobs' own work competes with them.
    os.nice(max(0, JOB_NICENESS - os.nice(0)))  # the forkserver may have lowered it already
    settings = Settings.model_validate_json(settings_json)
    configure_logging(settings.logging.level, form=settings.logging.format, node=settings.node.name)
    job = work.job
    outcome: JobOutcome | _Failure
    with job_context(job):
        triton = TritonClient.for_endpoint(
            settings.triton, work.triton_url or settings.triton.grpc_url
        )
        try:
            outcome = replace(run_job(work, plugin, triton, settings), peak_memory_bytes=_peak())
        except TritonUnavailableError as exc:
            outcome = _Failure(str(exc), type(exc).__name__, triton_unavailable=True)
        except InfergateError as exc:
            outcome = _Failure(str(exc), type(exc).__name__)
        except Exception as exc:  # any failure of one job fails that job alone
            outcome = _Failure(f"the job failed: {unexpected(exc)}", type(exc).__name__)
        finally:
            triton.close()
        try:
            answer.send(outcome)
        except BrokenPipeError:
            # The gateway died meanwhile: its next start puts the job back in the queue.
            log.warning("inference.job.orphaned", reason="the gateway is gone; nothing records it")
        finally:
            answer.close()


def _peak() -> int:
    """This process's peak resident memory in bytes (Linux counts ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def job_context(job: JobRow) -> contextlib.AbstractContextManager[None]:
    """The job's identifiers on every log line within (UIDs, never patient data)."""
    return structlog.contextvars.bound_contextvars(
        job_id=job.job_id, series_uid=job.series_uid, study_uid=job.study_uid
    )
