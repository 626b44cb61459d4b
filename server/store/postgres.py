"""The state database in PostgreSQL: one database that every process of every gateway
node shares, through psycopg 3 and a small pool of connections per process.

Its transactions mean what SQLite's do. Each write transaction first takes one
transaction-level advisory lock, so write transactions run one at a time across
every node, as ``BEGIN IMMEDIATE`` makes them run on one machine: what a transaction
reads cannot change before it writes (READ COMMITTED gives each statement a snapshot
taken after the lock). A commit returns once PostgreSQL has flushed it to its WAL
(``synchronous_commit`` is set on for our sessions, whatever the server's default),
so ingest still acknowledges an instance only after its row is durable. A session
that holds the lock and then stalls (a node frozen mid-transaction) is ended by the
server after ``_STALLED_TRANSACTION``; a write waits at most ``_LOCK_WAIT`` for the
lock, as SQLite's busy timeout.

The queries are SQLite's forms (``?``, ``:name``); they are rewritten once each to
psycopg's and bound on the client (``ClientCursor``), so a parameter's type is its
value's, as in SQLite. The password does not belong in the URL: libpq reads it from
``PGPASSWORD`` or a password file (``PGPASSFILE``), which a Kubernetes secret can hold.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from infergate.errors import StoreError, StoreUnavailableError
from infergate.store.connection import Connection, Cursor, Parameters
from infergate.store.schema import (
    ADDED_COLUMNS,
    OPEN_ASSOCIATIONS_INDEX,
    SCHEMA,
    VERSION,
    WORK_SCHEMA,
    execute_script,
    for_postgresql,
)

# The advisory lock every write transaction holds (any constant; "INFERGAT" in ASCII).
_WRITE_LOCK = 0x494E464552474154
_LOCK_WAIT = "10s"
_STALLED_TRANSACTION = "60s"
_CONNECT_TIMEOUT_S = 10
# How long a query waits for a pooled connection when none can be had (the server
# down): then it fails as unavailable, instead of holding a listener thread longer.
_POOL_WAIT_S = 5.0
# A string literal, a cast, a named parameter, a positional one, or a percent sign.
_TOKEN = re.compile(r"'(?:[^']|'')*'|::|:([A-Za-z_]\w*)|\?|%")


@functools.lru_cache(maxsize=1024)
def to_psycopg(sql: str) -> str:
    """``sql`` with SQLite's parameter marks as psycopg's, and its percent signs
    (in literals too: psycopg reads every one) doubled."""

    def rewrite(match: re.Match[str]) -> str:
        text = match.group(0)
        if text.startswith("'"):
            return text.replace("%", "%%")
        if match.group(1):
            return f"%({match.group(1)})s"
        return {"?": "%s", "%": "%%"}.get(text, text)

    return _TOKEN.sub(rewrite, sql)


def _values(parameters: Parameters) -> Parameters:
    """SQLite stores a bool as 0 or 1 and so do our INTEGER columns here."""
    if isinstance(parameters, Mapping):
        return {k: int(v) if isinstance(v, bool) else v for k, v in parameters.items()}
    return [int(v) if isinstance(v, bool) else v for v in parameters]


class _Number(Loader):
    """NUMERIC as int or float: PostgreSQL's SUM of a BIGINT column is NUMERIC, which
    psycopg would give as a Decimal, where SQLite gives an int."""

    def load(self, data: Buffer) -> int | float:
        text = bytes(data).decode("ascii")
        try:
            return int(text)
        except ValueError:
            return float(text)


class _Connection:
    """A psycopg connection that takes the store's queries."""

    def __init__(self, connection: psycopg.Connection[Any]) -> None:
        self._connection = connection

    def execute(self, sql: str, parameters: Parameters = (), /) -> Cursor:
        return self._connection.execute(to_psycopg(sql), _values(parameters))

    def executemany(self, sql: str, parameters: Iterable[Parameters], /) -> Cursor:
        cursor = self._connection.cursor()
        cursor.executemany(to_psycopg(sql), [_values(p) for p in parameters])
        return cursor


def _configure(connection: psycopg.Connection[Any]) -> None:
    connection.adapters.register_loader("numeric", _Number)
    connection.execute(
        "SET synchronous_commit = on;"
        f" SET lock_timeout = '{_LOCK_WAIT}';"
        f" SET idle_in_transaction_session_timeout = '{_STALLED_TRANSACTION}'"
    )


def describe(url: str) -> str:
    """Where ``url`` points, without its user or password: for messages and logs."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(an unreadable URL)"
    host, port, name = parts.get("host", ""), parts.get("port", "5432"), parts.get("dbname", "")
    return f"postgresql://{host}:{port}/{name}"


class PostgresBackend:
    kind = "postgresql"

    def __init__(self, url: str, *, pool_size: int = 4) -> None:
        self._where = describe(url)
        options: dict[str, Any] = {"autocommit": True, "cursor_factory": psycopg.ClientCursor}
        try:
            # The first connection alone, so that a wrong address or password is
            # reported as the server gave it (a pool would only time out).
            with psycopg.connect(url, connect_timeout=_CONNECT_TIMEOUT_S, **options) as first:
                _configure(first)
                self._migrate(first)
        except psycopg.Error as exc:
            raise StoreError(f"cannot open the state store {self._where}: {exc}") from exc
        self._pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"connect_timeout": _CONNECT_TIMEOUT_S, **options},
            configure=_configure,
            timeout=_POOL_WAIT_S,
            name="infergate-store",
            open=True,
        )

    def _migrate(self, connection: psycopg.Connection[Any]) -> None:
        with self._locked(connection) as db:  # one process creates it; the others see it
            if db.execute("SELECT to_regclass('infergate_schema')").fetchone()[0] is None:
                execute_script(db, for_postgresql(SCHEMA))
                execute_script(db, for_postgresql(WORK_SCHEMA))
                db.execute(OPEN_ASSOCIATIONS_INDEX)
                db.execute("CREATE TABLE infergate_schema (version INTEGER NOT NULL)")
                db.execute("INSERT INTO infergate_schema VALUES (?)", (VERSION,))
                return
            (version,) = db.execute("SELECT version FROM infergate_schema").fetchone()
            if version > VERSION:
                raise StoreError(
                    f"the state store {self._where} has schema version {version}, written"
                    f" by a newer Infergate; this one knows version {VERSION}"
                )
            if version == VERSION:
                return
            for step in sorted(v for v in ADDED_COLUMNS if v > version):
                for (table, column), definition in ADDED_COLUMNS[step].items():
                    db.execute(
                        f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}"
                        f" {for_postgresql(definition)}"
                    )
            execute_script(db, for_postgresql(SCHEMA))
            execute_script(db, for_postgresql(WORK_SCHEMA))
            db.execute("UPDATE infergate_schema SET version = ?", (VERSION,))

    @contextmanager
    def _locked(self, connection: psycopg.Connection[Any]) -> Iterator[Connection]:
        """A write transaction; its BEGIN and the lock in one round trip (the client-side
        cursor sends both in one query)."""
        connection.execute(f"BEGIN; SELECT pg_advisory_xact_lock({_WRITE_LOCK})")
        try:
            yield _Connection(connection)
        except BaseException:
            with contextlib.suppress(psycopg.Error):  # a broken connection: the pool drops it
                connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def close(self) -> None:
        self._pool.close()

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        try:
            with self._pool.connection() as connection, self._locked(connection) as db:
                yield db
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailableError(self._unavailable(exc)) from exc
        except psycopg.Error as exc:
            raise StoreError(f"state store transaction failed ({self._where}): {exc}") from exc

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        try:
            with self._pool.connection() as connection:
                yield _Connection(connection)
        except (psycopg.OperationalError, PoolTimeout) as exc:
            raise StoreUnavailableError(self._unavailable(exc)) from exc
        except psycopg.Error as exc:
            raise StoreError(f"state store read failed ({self._where}): {exc}") from exc

    def _unavailable(self, exc: Exception) -> str:
        """A connection lost or refused, a lock not had in time: the server's words,
        first line only (libpq adds hints)."""
        told = str(exc).strip().splitlines() or [type(exc).__name__]
        return f"the state store {self._where} is unavailable: {told[0]}"
