"""Jobs in processes of their own (``work.job_processes``, the default): a failure, a
crash of the interpreter and a hung step each fail their own job, a job past its
deadline has its process killed, and Triton being away is retried as on threads.

The plugins are real plugin objects, defined here so that the job process can import
them when it unpickles them. Triton is a real client against a port where nothing
listens; the jobs that reach Triton end there.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import structlog
from workers import drain_jobs, queue_job

from infergate.config import Settings
from infergate.errors import PluginError
from infergate.inference.triton import TritonClient
from infergate.plugin_api import Findings, PluginSpec, Series
from infergate.plugins import LoadedPlugin, discover
from infergate.store import Store
from infergate.testing import ChestPhantom
from infergate.work.scheduler import JobScheduler
from infergate.work.states import JobState
from peers import free_port, wait_until


def _lung_spec(name: str) -> PluginSpec:
    lung = next(p for p in discover() if p.spec.name == "ct_lung")
    return dataclasses.replace(lung.spec, name=name)


class _Failing:
    """preprocess does what ``how`` says: raise, kill its own process, or hang."""

    def __init__(self, name: str, how: str) -> None:
        self.spec = _lung_spec(name)
        self.how = how

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        if self.how == "raise":
            raise ValueError("SENTINEL^PATIENT quoted by a careless plugin")
        if self.how == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(3600)
        raise AssertionError("never reached")

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        raise AssertionError("never reached")


class _Reporting(_Failing):
    """preprocess writes how many objects its process's collector leaves alone
    (``gc.freeze``), then fails its job."""

    def __init__(self, report: Path) -> None:
        super().__init__("reports", "raise")
        self.report = report

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        self.report.write_text(str(gc.get_freeze_count()))
        raise ValueError("reported")


class _Unpicklable(_Failing):
    def __init__(self) -> None:
        super().__init__("unpicklable", "raise")
        self.lock = threading.Lock()


@pytest.fixture
def triton() -> TritonClient:
    # The gateway's client; jobs in processes make their own from the settings.
    return TritonClient("127.0.0.1:1", timeout_s=5)


def _settings(**work: Any) -> Settings:
    return Settings.model_validate(
        {
            "work": work,
            "assembly": {"quiet_period_s": 1000},
            # Nothing listens there: a job that reaches Triton finds it unavailable.
            "triton": {"grpc_port": free_port(), "unavailable_attempts": 2, "retry_delay_s": 0},
        }
    )


def _events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


def test_a_plugin_that_raises_in_its_process_fails_its_job_without_its_message(
    tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(tmp_path / "s.db")
    queue_job(store, "bad", "raises", small_phantom.paths)
    plugin = LoadedPlugin(_Failing("raises", "raise"), "test")
    with structlog.testing.capture_logs() as logs:
        drain_jobs(JobScheduler(_settings(), store, [plugin], triton), store)
    job = store.job("bad")
    assert job.state is JobState.FAILED
    assert job.error is not None
    assert job.error.startswith("plugin raises failed in preprocess: ValueError raised in")
    assert "test_job_process.py" in job.error
    (failed,) = _events(logs, "inference.job.failed")
    assert failed["error"] == "PluginError"  # what the job raised, in its process
    assert "SENTINEL" not in job.error
    assert "SENTINEL" not in repr(logs)


def test_a_job_whose_process_dies_fails_alone_and_the_next_job_runs(
    tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(tmp_path / "s.db")
    queue_job(store, "dies", "dies", small_phantom.paths, now=1.0)
    queue_job(store, "next", "ct_lung", small_phantom.paths, now=2.0)
    lung = next(p for p in discover() if p.spec.name == "ct_lung")
    plugins = [LoadedPlugin(_Failing("dies", "die"), "test"), lung]
    settings = _settings(inference_slots=2, urgent_reserved_slots=0, per_plugin_slots=1)
    drain_jobs(JobScheduler(settings, store, plugins, triton), store)
    dies = store.job("dies")
    assert (dies.state, dies.error) == (
        JobState.FAILED,
        "the job's process died of SIGKILL before it answered",
    )
    # The next job ran in a process of its own: its volume, its preprocess, then
    # Triton, which is not there (tried twice).
    after = store.job("next")
    assert after.state is JobState.FAILED
    assert after.error is not None
    assert "(tried 2 times)" in after.error


def test_a_job_past_its_deadline_has_its_process_killed(
    tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(tmp_path / "s.db")
    queue_job(store, "hung", "hangs", small_phantom.paths)
    settings = _settings(job_deadline_s=2)
    scheduler = JobScheduler(
        settings, store, [LoadedPlugin(_Failing("hangs", "hang"), "t")], triton
    )
    with structlog.testing.capture_logs() as logs:
        drain_jobs(scheduler, store, timeout=60)
    (started,) = _events(logs, "inference.job.process")
    job = store.job("hung")
    assert job.state is JobState.FAILED
    assert job.error == "the job ran past its deadline of 2 s (work.job_deadline_s)"
    # The process is gone (not left running, holding the series in memory).
    wait_until(lambda: not Path(f"/proc/{started['pid']}").exists(), 10, "the process to end")
    assert not scheduler.running()


def test_a_plugin_that_cannot_go_to_a_job_process_is_refused_at_start(
    tmp_path: Path, triton: TritonClient
) -> None:
    plugin = LoadedPlugin(_Unpicklable(), "test")
    with pytest.raises(PluginError, match="plugin unpicklable cannot be sent to a job process"):
        JobScheduler(_settings(), Store(tmp_path / "s.db"), [plugin], triton)
    # On threads it may run.
    JobScheduler(_settings(job_processes=False), Store(tmp_path / "t.db"), [plugin], triton)


def test_a_job_process_does_not_collect_what_the_forkserver_warmed_up(
    tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    """The forkserver's modules and warm-up objects are frozen out of the collector: a
    job's collections leave them (and the pages they share with the forkserver)
    untouched instead of copying them into each job process."""
    store = Store(tmp_path / "s.db")
    queue_job(store, "reported", "reports", small_phantom.paths)
    report = tmp_path / "frozen.txt"
    plugin = LoadedPlugin(_Reporting(report), "test")
    drain_jobs(JobScheduler(_settings(), store, [plugin], triton), store)
    assert store.job("reported").state is JobState.FAILED
    # Every object of the imported modules: far more than any job makes before its
    # preprocess (numpy, pydicom and highdicom alone are hundreds of thousands).
    assert int(report.read_text()) > 100_000
