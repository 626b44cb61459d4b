"""Group commit: instances received at the same time become durable together.

Before its C-STORE is answered, an instance needs its file written through to the
disk, the file moved into the spool with the folder fsynced, and a committed row in
the state store (whose commit fsyncs the SQLite WAL). Each association's thread
syncs its own file, in parallel with the others. The move and the commit are done
for whatever has queued up while the previous commit ran: one folder fsync and one
transaction for all of them, so the fsyncs per instance fall as associations are
added instead of queueing behind each other. The thread that finds no commit under
way does it for everyone waiting; nobody waits longer than one commit.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from infergate.errors import InfergateError
from infergate.ingest.metrics import STORE_COMMIT_SECONDS
from infergate.ingest.spool import Spool
from infergate.store import ArrivalOutcome, InstanceRecord, Store


@dataclass
class _Waiting:
    partial: Path
    record: InstanceRecord
    result: tuple[InstanceRecord, ArrivalOutcome] | None = None
    error: InfergateError | None = None
    done: bool = False


@dataclass
class InstanceCommitter:
    """Moves received files into the spool and commits their records, in groups."""

    spool: Spool
    store: Store
    replace_changed: bool
    _lock: threading.Condition = field(init=False, default_factory=threading.Condition)
    _queue: list[_Waiting] = field(init=False, default_factory=list)
    _committing: bool = field(init=False, default=False)

    def commit(
        self, partial: Path, record: InstanceRecord
    ) -> tuple[InstanceRecord, ArrivalOutcome]:
        """Make ``partial`` (a file under the spool's ``tmp/``) durable in the spool and
        commit ``record`` for it; returns the record with its spool path, and what the
        instance was. Raises what the spool or the store raised; nothing stays then."""
        self.spool.sync(partial)  # in this thread, in parallel with the others
        waiting = _Waiting(partial, record)
        with self._lock:
            self._queue.append(waiting)
            while not waiting.done:
                if self._committing:
                    self._lock.wait()
                    continue
                group, self._queue = self._queue, []
                self._committing = True
                self._lock.release()
                try:
                    self._commit(group)
                finally:
                    self._lock.acquire()
                    self._committing = False
                    self._lock.notify_all()
        if waiting.result is None:
            raise waiting.error or InfergateError("the commit ended without a result")
        return waiting.result

    def _commit(self, group: list[_Waiting]) -> None:
        started = time.perf_counter()
        try:
            finals = self.spool.place([w.partial for w in group])
            records = [
                dataclasses.replace(w.record, path=final)
                for w, final in zip(group, finals, strict=True)
            ]
            try:
                outcomes = self.store.record_instances(
                    records, replace_changed=self.replace_changed
                )
            except InfergateError:
                self.spool.remove(finals)  # never acknowledged, so not kept
                raise
        except InfergateError as exc:
            for waiting in group:
                waiting.error = exc
                waiting.done = True
            return
        except BaseException as exc:  # anything else: every waiter must still wake
            for waiting in group:
                waiting.error = InfergateError(f"commit failed: {type(exc).__name__}")
                waiting.done = True
            raise
        STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
        for waiting, record, outcome in zip(group, records, outcomes, strict=True):
            waiting.result = (record, outcome)
            waiting.done = True
