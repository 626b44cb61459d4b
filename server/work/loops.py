"""The threads that drive the stages: each calls one step function over and over.

A failure inside one round (the store busy, a bug met by one unit of work) is logged
and the loop goes on with the next round; a stage whose every round fails for
``max_failures`` rounds in a row can no longer work, says so and stops, and ``serve``
then exits non-zero so that its supervisor restarts it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from infergate.errors import InfergateError, unexpected
from infergate.logs import get_logger

log = get_logger(__name__)


class StageLoop:
    """A daemon thread calling ``step`` every ``interval_s`` until ``stop`` is set."""

    def __init__(
        self,
        name: str,
        step: Callable[[], object],  # what it returns is its own business
        interval_s: float,
        stop: threading.Event,
        max_failures: int = 60,
    ) -> None:
        self.name = name
        self._step = step
        self._interval_s = interval_s
        self._stop = stop
        self._max_failures = max_failures
        # Why the stage stopped working, once it has.
        self.failure: str | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _run(self) -> None:
        log.info("work.stage.started", stage=self.name)
        failures = 0
        while not self._stop.is_set():
            try:
                self._step()
                failures = 0
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
            self._stop.wait(self._interval_s)
        log.info("work.stage.stopped", stage=self.name)
