"""Imported by the forkserver that job processes are forked from: it warms up once,
so that every job process starts with what the first job would otherwise pay for.

It warms up at the job processes' lower CPU priority (``lifetime.JOB_NICENESS``): at
start it competes with the listeners and Triton's model stubs for the cores, and they
are what the gateway's readiness waits for. Job processes inherit the priority.
"""

import os

from infergate.lifetime import JOB_NICENESS

os.nice(JOB_NICENESS)

from infergate.work.warmup import warm  # noqa: E402 - imported at the lower priority

warm()
