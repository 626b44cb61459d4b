"""Listening sockets shared by several listener processes, and the loop that accepts on one.

To use more than one core, ``infergate serve`` binds each listening socket once and
hands it to every listener process; each process accepts on it, and the kernel
gives each new connection to whichever process accepts first. A process busy with
its own associations is slower to accept, so new connections go to the idler one
(with SO_REUSEPORT the kernel would instead spread them by a hash of the addresses,
blind to load). The socket is non-blocking: a process that loses the race to accept gets
EAGAIN and moves on, instead of blocking its accept loop. A process stopping closes
only its own descriptor: shutting the socket down would stop every process on it.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from infergate.config import IngestSettings
from infergate.errors import ListenerError
from infergate.logs import get_logger

log = get_logger(__name__)

_BACKLOG = 128
_POLL_S = 0.2  # how soon an accept loop notices it should stop


def open_listening_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on ``host``:``port`` (IPv4 or IPv6), ready to be shared."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


@dataclass(frozen=True)
class ListeningSockets:
    """The sockets a listener serves: plain TCP on ``ingest.port``, TLS on ``tls.port``."""

    plain: socket.socket | None
    tls: socket.socket | None

    @classmethod
    def open(cls, settings: IngestSettings) -> ListeningSockets:
        """Bind every configured port; raises :class:`ListenerError` naming the one that
        cannot be bound."""
        wanted = {
            "plain": ("ingest.port", settings.port) if settings.plain else None,
            "tls": ("ingest.tls.port", settings.tls.port) if settings.tls else None,
        }
        opened: dict[str, socket.socket | None] = {}
        try:
            for name, where in wanted.items():
                opened[name] = None
                if where is not None:
                    opened[name] = _bind(settings.host, *where)
        except ListenerError:
            for sock in opened.values():
                if sock is not None:
                    sock.close()
            raise
        return cls(plain=opened["plain"], tls=opened["tls"])

    def all(self) -> list[socket.socket]:
        return [sock for sock in (self.plain, self.tls) if sock is not None]

    def close(self) -> None:
        for sock in self.all():
            sock.close()


def _bind(host: str, key: str, port: int) -> socket.socket:
    try:
        return open_listening_socket(host, port)
    except OSError as exc:
        raise ListenerError(f"cannot listen on {host}:{port} ({key}): {exc.strerror}") from exc


def accept_connections(
    sock: socket.socket,
    stopping: threading.Event,
    on_connection: Callable[[socket.socket, tuple[str, int]], None],
) -> None:
    """Accept on the shared ``sock`` until ``stopping`` is set, handing each connection
    to ``on_connection`` (which must not block). Runs in a thread of its own."""
    while not stopping.is_set():
        try:
            ready, _, _ = select.select([sock], [], [], _POLL_S)
            if not ready:
                continue
            connection, address = sock.accept()
        except (BlockingIOError, InterruptedError):  # another process took it
            continue
        except OSError as exc:
            if stopping.is_set() or sock.fileno() < 0:
                return
            # Out of descriptors or memory: refuse for a moment rather than spin.
            log.error("ingest.accept.failed", reason=exc.strerror or str(exc))
            time.sleep(_POLL_S)
            continue
        connection.setblocking(True)
        on_connection(connection, (str(address[0]), int(address[1])))
