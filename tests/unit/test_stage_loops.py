"""The stage loops: rounds at the interval, sooner when the step says when it is due
or another stage wakes the loop, and a stop seen at once."""

from __future__ import annotations

import threading
import time

import pytest
import structlog

from infergate.errors import StoreUnavailableError
from infergate.work import loops
from infergate.work.loops import StageLoop, each_interval
from peers import wait_until

LONG = 3600.0  # an interval no test waits out


def _rounds(due_in: float | None) -> tuple[list[float], StageLoop, threading.Event]:
    rounds: list[float] = []

    def step() -> float | None:
        rounds.append(time.monotonic())
        return due_in

    stop = threading.Event()
    return rounds, StageLoop("test", step, LONG, stop), stop


def test_a_step_that_says_when_it_is_due_is_called_then() -> None:
    rounds, loop, stop = _rounds(due_in=0.05)
    loop.start()
    try:
        wait_until(lambda: len(rounds) >= 4, 5, "four rounds at 0.05 s", 0.01)
    finally:
        stop.set()
        loop.join(5)
    assert not loop.is_alive()


def test_a_woken_loop_runs_its_next_round_at_once() -> None:
    rounds, loop, stop = _rounds(due_in=None)
    loop.start()
    try:
        wait_until(lambda: len(rounds) == 1, 5, "the first round", 0.01)
        loop.wake()
        wait_until(lambda: len(rounds) == 2, 5, "the round it was woken for", 0.01)
        time.sleep(0.2)
        assert len(rounds) == 2  # then the interval again
    finally:
        stop.set()
        loop.join(5)


def test_join_after_stop_does_not_wait_out_the_interval() -> None:
    rounds, loop, stop = _rounds(due_in=None)
    loop.start()
    wait_until(lambda: len(rounds) == 1, 5, "the first round", 0.01)
    stop.set()
    started = time.monotonic()
    loop.join(5)
    assert not loop.is_alive()
    assert time.monotonic() - started < 5
    assert len(rounds) == 1


def test_a_stage_whose_every_round_fails_stops_and_says_why() -> None:
    def step() -> None:
        raise RuntimeError("the store is gone")

    stop = threading.Event()
    loop = StageLoop("broken", each_interval(step), 0.001, stop, max_failures=3)
    loop.start()
    loop.join(5)
    stop.set()
    assert not loop.is_alive()
    assert loop.failure is not None
    assert loop.failure.startswith("3 rounds in a row failed")


def test_a_stage_waits_for_a_store_that_cannot_be_reached_and_goes_on_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database restarting is not a stage that cannot work: however many rounds find
    it down, the stage waits (trying every few seconds) and goes on once it is back."""
    monkeypatch.setattr(loops, "_STORE_RETRY_S", 0.001)
    down = threading.Event()
    down.set()
    rounds: list[bool] = []

    def step() -> None:
        rounds.append(down.is_set())
        if down.is_set():
            raise StoreUnavailableError("the state store postgresql://db:5432/x is unavailable")

    stop = threading.Event()
    loop = StageLoop("waiting", each_interval(step), 0.001, stop, max_failures=3)
    with structlog.testing.capture_logs() as logs:
        loop.start()
        wait_until(lambda: len(rounds) >= 40, 5, "forty rounds with the store down", 0.01)
        down.clear()
        wait_until(lambda: rounds and not rounds[-1], 5, "a round with the store back", 0.01)
        stop.set()
        loop.join(5)
    assert loop.failure is None
    events = [e["event"] for e in logs]
    assert "work.stage.failed" not in events
    # The first round that found it down, then every 30th.
    told = events.count("work.stage.waiting_for_store")
    assert told == 1 + (rounds.count(True) - 1) // 30 >= 2
    assert "work.stage.store_back" in events
