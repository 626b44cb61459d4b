"""The threads that drive the stages: each calls one step function over and over.

A failure inside one round (the store busy, a bug met by one unit of work) is logged
and the loop goes on with the next round; a stage whose every round fails for
``max_failures`` rounds in a row can no longer work, says so and stops, and ``serve``
then exits non-zero so that its supervisor restarts it. A state store that cannot be
reached (PostgreSQL restarting or failing over) is not such a failure: a restart
would not bring it back, so the stage waits for it, trying every few seconds
(``work.stage.waiting_for_store``, then ``work.stage.store_back``), and readiness
says the store is down meanwhile.

A loop's next round comes after its interval, sooner when its step says when it is
due (the next series to complete), and at once when another stage wakes it (a job's
results recorded wake the export): work that waits for the next poll is overhead
every study pays.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

from infergate.errors import InfergateError, StoreUnavailableError, unexpected
from infergate.logs import get_logger

log = get_logger(__name__)
T = TypeVar("T")

# While the store cannot be reached: a round this often at most, and a log line for
# the first round that finds it so and then every this many.
_STORE_RETRY_S = 2.0
_STORE_LOG_EVERY = 30

# A stage's step: one round's work; it returns in how many seconds its next round is
# due when that is sooner than the loop's interval, else None.
Step = Callable[[], float | None]


def each_interval(call: Callable[[], T]) -> Step:
    """``call`` as a step whose rounds come at the loop's interval (what it returns
    is its own business)."""

    def step() -> None:
        call()

    return step


class StageLoop:
    """A daemon thread calling ``step`` every ``interval_s`` (sooner when the step or
    :meth:`wake` says so) until ``stop`` is set."""

    def __init__(
        self,
        name: str,
        step: Step,
        interval_s: float,
        stop: threading.Event,
        max_failures: int = 60,
    ) -> None:
        self.name = name
        self._step = step
        self._interval_s = interval_s
        self._stop = stop
        self._max_failures = max_failures
        self._woken = threading.Event()
        # Why the stage stopped working, once it has.
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        """Run the next round now (once the one in progress, if any, ends)."""
        self._woken.set()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        """Wait for the thread to end, once ``stop`` is set (woken, it sees it now)."""
        self._woken.set()
        self._thread.join(timeout_s)

    def _run(self) -> None:
        log.info("work.stage.started", stage=self.name)
        failures = waiting = 0
        while not self._stop.is_set():
            self._woken.clear()  # what woke it is seen by this round
            due_in: float | None = None
            try:
                due_in = self._step()
                failures = 0
                if waiting:
                    log.info("work.stage.store_back", stage=self.name, rounds_waited=waiting)
                    waiting = 0
            except StoreUnavailableError as exc:
                if waiting % _STORE_LOG_EVERY == 0:
                    log.warning("work.stage.waiting_for_store", stage=self.name, reason=str(exc))
                waiting += 1
            except Exception as exc:  # one round's failure must not end the stage
                failures += 1
                reason = str(exc) if isinstance(exc, InfergateError) else unexpected(exc)
                log.error(
                    "work.stage.step_failed",
                    stage=self.name,
                    reason=reason,
                    consecutive=failures,
                    of=self._max_failures,
                )
                if failures >= self._max_failures:
                    self.failure = f"{failures} rounds in a row failed, the last: {reason}"
                    log.critical("work.stage.failed", stage=self.name, reason=self.failure)
                    return
            wait = self._interval_s if due_in is None else min(max(due_in, 0.0), self._interval_s)
            if waiting:
                wait = max(wait, _STORE_RETRY_S)
            self._woken.wait(wait)
        log.info("work.stage.stopped", stage=self.name)
