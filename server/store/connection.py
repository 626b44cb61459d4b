"""What the store's queries need of a database connection, whichever backend holds it.

The queries are written once, with ``?`` for a positional parameter and ``:name`` for
a named one (SQLite's forms); sqlite3's connection takes them as they are and the
PostgreSQL connection rewrites them (``store.postgres``). A cursor gives rows as tuples.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

Parameters = Sequence[Any] | Mapping[str, Any]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Any: ...


class Connection(Protocol):
    def execute(self, sql: str, parameters: Parameters = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Parameters], /) -> Cursor: ...


class Backend(Protocol):
    """One database: its write transactions, its reads, and closing it."""

    #: ``sqlite`` or ``postgresql``: what logs and the ops endpoint name
    kind: str

    def transaction(self) -> AbstractContextManager[Connection]:
        """A write transaction: no other write transaction, of any process on any
        node, runs between its first statement and its commit."""
        ...

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for a few reads in a row (each sees what is committed)."""
        ...

    def close(self) -> None: ...
