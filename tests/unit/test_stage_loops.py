"""The stage loops: rounds at the interval, sooner when the step says when it is due
or another stage wakes the loop, and a stop seen at once."""

from __future__ import annotations

import threading
import time

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
