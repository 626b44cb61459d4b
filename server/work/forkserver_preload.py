"""Imported by the forkserver that job processes are forked from: it warms up once,
so that every job process starts with what the first job would otherwise pay for."""

from infergate.work.warmup import warm

warm()
