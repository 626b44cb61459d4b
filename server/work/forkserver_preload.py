"""Imported by the forkserver that job processes are forked from: it warms up once,
so that every job process starts with what the first job would otherwise pay for.

It warms up at the job processes' lower CPU priority (``lifetime.JOB_NICENESS``): at
start it competes with the listeners and Triton's model stubs for the cores, and they
are what the gateway's readiness waits for. Job processes inherit the priority.

It imports the job process's module (and so the Triton client and the job's
steps), and the command line's module and what it imports: a forkserver's child
runs the parent's main script again before its target (multiprocessing's spawn
preparation), and the ``infergate`` script imports
``infergate.cli``. Imported here once, that costs each job nothing; left to each
job, it took ~0.7 s of every job's start.
"""

import gc
import os
import warnings

from infergate.lifetime import JOB_NICENESS

os.nice(JOB_NICENESS)

from infergate.work.warmup import warm  # noqa: E402 - imported at the lower priority

warm()

import infergate.cli  # noqa: E402 - see above
import infergate.work.job_process  # noqa: E402, F401 - a job's own modules (the Triton client)

# Started as `python -m infergate.cli`, each child runs that module again by runpy,
# which warns, on stderr and before the child's logging is set up, that the module is
# imported already: it is, on purpose (above).
warnings.filterwarnings(
    "ignore",
    message=r"'infergate\.cli' found in sys\.modules",
    category=RuntimeWarning,
    module="runpy",
)

# Everything above lives as long as the forkserver: frozen out of the collector, so a
# job's collections do not walk it and write to each object's header, which would copy
# every page of it into each job process (copy-on-write, ~26,000 page faults, 0.15 s of
# a 300-slice job's encoding).
gc.collect()
gc.freeze()
