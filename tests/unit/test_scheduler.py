"""The inference worker: ordering, slots kept for urgent work, containment of any
failure to its own job, deadlines, memory and Triton retries.

The plugins here are real plugin objects (the plugin interface); the ones that block
or raise stand for a hung model or a plugin with a bug. Jobs run on real series
written to disk; Triton is a real client against a port where nothing listens. The
jobs run on threads here (``work.job_processes: false``), so that a plugin can wait on
an event the test sets; test_job_process.py runs them in their own processes.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import structlog
from workers import drain_jobs, queue_job

from infergate.config import Settings
from infergate.inference.triton import TritonClient
from infergate.plugin_api import Findings, PluginSpec, Series
from infergate.plugins import LoadedPlugin, discover
from infergate.store import Store
from infergate.testing import ChestPhantom
from infergate.work.scheduler import JobScheduler
from infergate.work.states import JobState
from peers import wait_until


@pytest.fixture
def triton() -> Iterator[TritonClient]:
    client = TritonClient("127.0.0.1:1", timeout_s=5)  # nothing listens: UNAVAILABLE
    yield client
    client.close()


def _step_until(scheduler: JobScheduler, condition: Callable[[], bool], what: str) -> None:
    def stepped() -> bool:
        scheduler.step()
        return condition()

    wait_until(stepped, 30, what, interval=0.05)


def _settings(**work: Any) -> Settings:
    # Jobs on threads: these plugins coordinate with the test through threading.Event.
    return Settings.model_validate(
        {"work": {"job_processes": False, **work}, "assembly": {"quiet_period_s": 1000}}
    )


class _Blocking:
    """ct_lung's spec under another name; preprocess waits until released (a hung step)."""

    def __init__(self, name: str) -> None:
        lung = next(p for p in discover() if p.spec.name == "ct_lung")
        self.spec: PluginSpec = dataclasses.replace(lung.spec, name=name)
        self.started = threading.Event()
        self.release = threading.Event()

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        self.started.set()
        self.release.wait(60)
        raise RuntimeError("released")

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        raise AssertionError("never reached")


class _Raising(_Blocking):
    """A plugin with a bug: preprocess raises a ValueError quoting a value."""

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        raise ValueError("SENTINEL^PATIENT is not a number")


def test_an_urgent_job_goes_before_the_normal_jobs_still_queued(
    tmp_path: Path, triton: TritonClient
) -> None:
    class Arriving(Store):
        arrival: str | None = None

        def fail_job(self, job_id: str, error: str, now: float, node: str | None = None) -> bool:
            changed = super().fail_job(job_id, error, now, node)
            if self.arrival is not None:
                arrival, self.arrival = self.arrival, None
                queue_job(
                    self, arrival, arrival, [Path("/spool/missing.dcm")], priority="urgent", now=now
                )
            return changed

    store = Arriving(tmp_path / "s.db")
    for index in range(3):
        queue_job(store, f"n{index}", f"n{index}", [Path("/spool/missing.dcm")], now=index)
    store.arrival = "u"  # arrives once the first job is done
    # One slot, none kept: jobs run one at a time. No plugin is installed, so each
    # job fails at once, naming its plugin (= its id).
    scheduler = JobScheduler(
        _settings(inference_slots=1, urgent_reserved_slots=0), store, [], triton
    )
    with structlog.testing.capture_logs() as logs:
        drain_jobs(scheduler, store)
    order = [e["plugin"] for e in logs if e["event"] == "inference.job.failed"]
    assert order == ["n0", "u", "n1", "n2"]


def test_an_urgent_job_starts_while_normal_jobs_hold_every_normal_slot(
    database: Path | str, tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    slow = _Blocking("slow")
    queue_job(store, "normal1", "slow", small_phantom.paths, now=1.0)
    queue_job(store, "normal2", "slow", small_phantom.paths, now=2.0)
    settings = _settings(inference_slots=2, urgent_reserved_slots=1)
    scheduler = JobScheduler(settings, store, [LoadedPlugin(slow, "test")], triton)
    try:
        scheduler.step()
        assert slow.started.wait(30)
        queue_job(
            store, "urgent", "missing", [Path("/spool/missing.dcm")], priority="urgent", now=3.0
        )
        with structlog.testing.capture_logs() as logs:
            _step_until(
                scheduler,
                lambda: store.job("urgent").state is JobState.FAILED,
                "the urgent job to run",
            )
        # It ran while the normal job still held its slot, and the second normal job
        # did not take the slot kept for urgent work.
        assert store.job("normal1").state is JobState.RUNNING
        assert store.job("normal2").state is JobState.QUEUED
        (failed,) = [e for e in logs if e["event"] == "inference.job.failed"]
        assert failed["plugin"] == "missing"
    finally:
        slow.release.set()
    drain_jobs(scheduler, store)


def test_a_plugin_that_raises_fails_its_own_job_and_the_next_one_runs(
    database: Path | str, tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    buggy = _Raising("buggy")
    queue_job(store, "bad", "buggy", small_phantom.paths, now=1.0)
    queue_job(store, "next", "other", [Path("/spool/missing.dcm")], now=2.0)
    scheduler = JobScheduler(_settings(), store, [LoadedPlugin(buggy, "test")], triton)
    with structlog.testing.capture_logs() as logs:
        drain_jobs(scheduler, store)
    bad = store.job("bad")
    assert bad.state is JobState.FAILED
    assert bad.error is not None
    assert bad.error.startswith("plugin buggy failed in preprocess: ValueError raised in")
    assert "test_scheduler.py" in bad.error
    # The exception's message quoted a value: it is in neither the record nor the log.
    assert "SENTINEL" not in bad.error
    assert "SENTINEL" not in repr(logs)
    assert store.job("next").state is JobState.FAILED  # it ran, and found no plugin


def test_a_poisoned_header_fails_its_job_with_the_step_and_the_place(
    database: Path | str, tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    poisoned = []
    for index, path in enumerate(small_phantom.paths):
        ds = pydicom.dcmread(path)
        ds.RescaleSlope = "7.77"
        target = tmp_path / f"{index}.dcm"
        ds.save_as(target)
        # Not a number in a DS element, as a broken modality writes it (pydicom will
        # not write one): the header comes before the pixels, so the first match is it.
        target.write_bytes(target.read_bytes().replace(b"7.77", b"abcd", 1))
        poisoned.append(target)
    store = Store(database)
    queue_job(store, "poisoned", "ct_lung", poisoned)
    lung = [p for p in discover() if p.spec.name == "ct_lung"]
    scheduler = JobScheduler(_settings(), store, lung, triton)
    drain_jobs(scheduler, store)
    job = store.job("poisoned")
    assert job.state is JobState.FAILED
    assert job.error is not None
    assert job.error.startswith("volume building failed: ValueError raised in"), job.error


def test_a_job_past_its_deadline_fails_frees_its_slot_and_its_late_result_is_dropped(
    database: Path | str, tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    hung = _Blocking("hung")
    queue_job(store, "hung", "hung", small_phantom.paths, now=1.0)
    queue_job(store, "after", "other", [Path("/spool/missing.dcm")], now=2.0)
    settings = _settings(inference_slots=2, urgent_reserved_slots=1, job_deadline_s=0.5)
    scheduler = JobScheduler(settings, store, [LoadedPlugin(hung, "test")], triton)
    try:
        _step_until(
            scheduler,
            lambda: store.job("after").state is JobState.FAILED,
            "the next job to run after the deadline freed the slot",
        )
        job = store.job("hung")
        assert job.state is JobState.FAILED
        assert job.error == "the job ran past its deadline of 0.5 s (work.job_deadline_s)"
    finally:
        hung.release.set()
    wait_until(lambda: not scheduler.running(), 30, "the hung thread to return")
    assert store.job("hung").state is JobState.FAILED  # its own outcome came too late


def test_a_series_too_large_for_the_machine_fails_with_that_reason(
    database: Path | str, tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    queue_job(store, "huge", "ct_lung", small_phantom.paths)
    lung = [p for p in discover() if p.spec.name == "ct_lung"]
    settings = _settings(memory_per_input_byte=1e9)
    scheduler = JobScheduler(settings, store, lung, triton)
    drain_jobs(scheduler, store)
    job = store.job("huge")
    assert job.state is JobState.FAILED
    assert job.error is not None
    assert "more than this machine's" in job.error


def test_a_job_over_the_memory_budget_waits_to_run_alone(
    database: Path | str, tmp_path: Path, triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    slow = _Blocking("slow")
    queue_job(store, "first", "slow", small_phantom.paths, now=1.0)
    queue_job(store, "big", "other", small_phantom.paths, now=2.0)
    size = store.series_bytes("series-first")
    # Room for one of them at a time.
    settings = _settings(memory_budget_bytes=int(size * 1.5), memory_per_input_byte=1.0)
    scheduler = JobScheduler(settings, store, [LoadedPlugin(slow, "test")], triton)
    try:
        with structlog.testing.capture_logs() as logs:
            scheduler.step()
            assert slow.started.wait(30)
            scheduler.step()
        assert store.job("big").state is JobState.QUEUED
        assert any(e["event"] == "inference.job.waiting_for_memory" for e in logs)
    finally:
        slow.release.set()
    drain_jobs(scheduler, store)
    assert store.job("big").state is JobState.FAILED  # it ran once alone: no such plugin


def _lung_job(store: Store, small_phantom: ChestPhantom) -> None:
    queue_job(store, "lung", "ct_lung", small_phantom.paths)


def test_triton_unavailable_is_retried_with_backoff_then_fails_the_job(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, triton: TritonClient
) -> None:
    store = Store(database)
    _lung_job(store, small_phantom)
    settings = Settings.model_validate(
        {
            "triton": {"unavailable_attempts": 3, "retry_delay_s": 0, "max_retry_delay_s": 0},
            "work": {"job_processes": False},
        }
    )
    lung = [p for p in discover() if p.spec.name == "ct_lung"]
    with structlog.testing.capture_logs() as logs:
        drain_jobs(JobScheduler(settings, store, lung, triton), store)
    retrying = [e for e in logs if e["event"] == "inference.job.retrying"]
    assert [(e["attempt"], e["of"]) for e in retrying] == [(1, 3), (2, 3)]
    (failed,) = [e for e in logs if e["event"] == "inference.job.failed"]
    assert failed["error"] == "TritonUnavailableError"
    assert "(tried 3 times)" in failed["reason"]
    job = store.job("lung")
    assert (job.state, job.attempts) == (JobState.FAILED, 3)


def test_a_job_waiting_to_retry_lets_others_run_and_keeps_its_reason(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, triton: TritonClient
) -> None:
    store = Store(database)
    _lung_job(store, small_phantom)
    settings = Settings.model_validate(
        {"triton": {"retry_delay_s": 30}, "work": {"job_processes": False}}
    )
    lung = [p for p in discover() if p.spec.name == "ct_lung"]
    with structlog.testing.capture_logs() as logs:
        drain_jobs(JobScheduler(settings, store, lung, triton), store)
    (retrying,) = [e for e in logs if e["event"] == "inference.job.retrying"]
    assert retrying["retry_in_s"] == 30
    job = store.job("lung")
    assert (job.state, job.attempts) == (JobState.QUEUED, 1)
    assert job.error is not None
    assert job.error.startswith("Triton model 'ct_lung_seg' failed")
    # Not runnable before its time, runnable after it.
    assert store.runnable_jobs() == []
    assert [j.job_id for j in store.runnable_jobs(now=time.time() + 31)] == ["lung"]


def test_a_job_recorded_wakes_the_stages_that_take_its_results(
    database: Path | str, tmp_path: Path, triton: TritonClient
) -> None:
    store = Store(database)
    queue_job(store, "j", "missing", [Path("/spool/missing.dcm")], now=1.0)
    scheduler = JobScheduler(_settings(), store, [], triton)
    woken = threading.Event()
    states: list[JobState] = []

    def wake() -> None:
        states.append(store.job("j").state)
        woken.set()

    scheduler.when_a_job_ends(wake)
    scheduler.step()
    assert woken.wait(30)
    # Called once its outcome was in the store, not before.
    assert states == [JobState.FAILED]
