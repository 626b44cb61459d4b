"""The state database, whichever backend holds it: a SQLite file (``store.sqlite``,
the embedded default) or a PostgreSQL database that several nodes share
(``store.postgres``). Both take the same queries, have the same schema
(``store.schema``) and give write transactions the same meaning: one at a time,
durable once committed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from infergate.errors import StoreError
from infergate.store.connection import Backend, Connection, Parameters
from infergate.store.sqlite import SqliteBackend
from infergate.work.states import DeliveryState, JobState, State, allowed

# The states in which a node holds a row (see store.nodes); a notification's is the
# same word as a delivery's.
_RUNNING = JobState.RUNNING.value
_SENDING = DeliveryState.SENDING.value


def held_by_condition(nodes: Sequence[str]) -> str:
    """The condition (one mark a node) that a row's ``node`` is one of ``nodes``, ''
    standing for a row no node holds."""
    return f"COALESCE(node, '') IN ({', '.join('?' * len(nodes))})"


def set_state(
    db: Connection,
    table: str,
    key: tuple[str, str] | None,
    old: tuple[State, ...],
    new: State,
    *,
    assignments: str = "",
    parameters: tuple[Any, ...] = (),
    holder: str | None = None,
    held_by: Sequence[str] | None = None,
) -> int:
    """Move the row ``key`` (column, value) of ``table`` (every row, when None) from
    one of the states ``old`` to ``new``, setting ``assignments`` too; returns how many
    rows changed (none when the row is in another state now).

    ``holder``: only while the gateway node of that name holds the row (its ``node``)
    if the row is in a state a node holds (a job running, a delivery or notification
    sending); ``held_by``: only rows one of these nodes holds ('' for none).

    Raises :class:`StoreError` for a transition the table does not list: a bug.
    """
    for source in old:
        if not allowed(source, new):
            raise StoreError(f"{table}: {source.value} -> {new.value} is not a transition")
    extra = f", {assignments}" if assignments else ""
    where = "" if key is None else f"{key[0]} = ? AND "
    conditions: list[Any] = [] if key is None else [key[1]]
    if holder is not None:
        where += f"(node = ? OR state NOT IN ('{_RUNNING}', '{_SENDING}')) AND "
        conditions.append(holder)
    if held_by is not None:
        where += f"{held_by_condition(held_by)} AND "
        conditions.extend(held_by)
    cur = db.execute(
        f"UPDATE {table} SET state = ?{extra}"  # noqa: S608 - constant fragments
        f" WHERE {where}state IN ({', '.join('?' * len(old))})",
        (new.value, *parameters, *conditions, *(s.value for s in old)),
    )
    return cur.rowcount


class Database:
    """The backend, its transactions and reads; the tables' methods live in subclasses.

    ``where`` is a SQLite file, or a ``postgresql://`` URL.
    """

    def __init__(self, where: Path | str, *, pool_size: int = 4) -> None:
        self._backend: Backend
        if isinstance(where, Path):
            self._backend = SqliteBackend(where)
        else:
            from infergate.store.postgres import PostgresBackend  # noqa: PLC0415 - psycopg only when used

            self._backend = PostgresBackend(where, pool_size=pool_size)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._backend.kind

    def close(self) -> None:
        self._backend.close()

    def _transaction(self) -> AbstractContextManager[Connection]:
        return self._backend.transaction()

    def _reading(self) -> AbstractContextManager[Connection]:
        return self._backend.reading()

    def _rows(self, sql: str, parameters: Parameters = ()) -> list[Any]:
        """The rows of one read."""
        with self._backend.reading() as db:
            return db.execute(sql, parameters).fetchall()
