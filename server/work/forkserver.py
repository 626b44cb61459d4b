"""The multiprocessing forkserver that job processes are forked from.

Light on purpose: ``serve`` starts the forkserver before it launches Triton, so that
the forkserver's warm-up (``forkserver_preload``, at the job processes' lower CPU
priority) is done by the time studies come, and this module imports nothing of the
job's steps.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver


def context() -> multiprocessing.context.ForkServerContext:
    """The forkserver context, its preload set: each job process starts warm."""
    forkserver = multiprocessing.get_context("forkserver")
    # Imported once by the forkserver, so each job process starts warm.
    forkserver.set_forkserver_preload(["infergate.work.forkserver_preload"])
    return forkserver


def start_forkserver() -> None:
    """Start the forkserver now: it imports and warms up (~2 s) while the gateway
    starts (Triton, the listeners) rather than when the first job comes."""
    context()
    multiprocessing.forkserver.ensure_running()
