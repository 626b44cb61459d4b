"""Child processes that do not outlive the process that started them."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

_PR_SET_PDEATHSIG = 1

# How much lower a job process's CPU priority is than the gateway's (its listeners
# and Triton are at the gateway's): ingest and the model get the cores first.
JOB_NICENESS = 5


def die_with_parent(parent: int) -> Callable[[], None]:
    """A function for the child to call first (``Popen(preexec_fn=...)``, or the start
    of a process's target): the child gets SIGKILL when the thread that started it
    dies, so that a gateway killed with SIGKILL (the OOM killer) leaves no orphan
    holding ports or memory. ``parent`` is the pid the child expects as its parent."""

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return arm
