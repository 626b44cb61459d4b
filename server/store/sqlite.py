"""The embedded state database: one SQLite file, one connection per process.

WAL journal with ``synchronous=FULL``: a commit that returned survives a crash of
the process or the machine, which is what lets ingest acknowledge an instance only
after its row is committed. Several processes open the same file (the listener
processes and the worker); SQLite serialises their write transactions, each of
which starts with ``BEGIN IMMEDIATE`` so that what it reads cannot change before it
writes. Within a process, one connection is shared by every thread behind a lock.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from infergate.errors import StoreError
from infergate.store.connection import Connection
from infergate.store.schema import (
    OPEN_ASSOCIATIONS_INDEX,
    SCHEMA,
    WORK_SCHEMA,
    migrate_sqlite,
)


class SqliteBackend:
    kind = "sqlite"

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute("PRAGMA busy_timeout=10000")
            self._db.executescript(SCHEMA)  # idempotent
            if not self._has_old_jobs_table():
                self._db.executescript(WORK_SCHEMA)
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the state store {path}: {exc}") from exc
        with self.transaction() as db:  # one process migrates; the others then see it done
            migrate_sqlite(self._db)
            db.execute(OPEN_ASSOCIATIONS_INDEX)

    def _has_old_jobs_table(self) -> bool:
        """A jobs table from before the work model (version 6), which the migration
        converts; a new or current database gets the work tables at once."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        return bool(columns) and "kind" not in columns

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"state store transaction failed: {exc}") from exc

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise StoreError(f"state store read failed: {exc}") from exc
