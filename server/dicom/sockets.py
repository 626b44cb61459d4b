"""Listening sockets shared by several listener processes, and the server that adopts one.

pynetdicom's server binds its own socket. To use more than one core, ``infergate
serve`` binds each listening socket once and hands it to every listener process;
each process runs a pynetdicom server on it, and the kernel gives each new
connection to whichever process accepts first. A process busy with its own
associations is slower to accept, so new connections go to the idler one (with
SO_REUSEPORT the kernel would instead spread them by a hash of the addresses, blind
to load). The socket is non-blocking: a process that loses the race to accept gets
EAGAIN, which socketserver ignores, instead of blocking its accept loop.
"""

from __future__ import annotations

import socket
import socketserver
from dataclasses import dataclass
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

from infergate.config import IngestSettings
from infergate.errors import ListenerError

_BACKLOG = 128


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


class AdoptingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a socket that is already listening.

    Takes the ``listening_socket`` keyword (passed through ``AE.make_server``) in place
    of binding one, and closes only its own descriptor on shutdown: pynetdicom's
    ``server_close`` shuts the socket down, which for a socket shared between processes
    would stop every process listening on it. The server is not one that
    ``AE.start_server`` made, so it is not in the AE's list of servers either.
    """

    def __init__(self, *args: Any, listening_socket: socket.socket, **kwargs: Any) -> None:
        self._adopted = listening_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # socketserver made a fresh socket before calling this; use ours instead.
        if self.socket is not None:
            self.socket.close()
        self.socket = self._adopted
        self.server_address = self._adopted.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def server_close(self) -> None:
        self._adopted.close()

    def shutdown(self) -> None:
        """Stop accepting and close this process's descriptor of the socket."""
        socketserver.BaseServer.shutdown(self)
        self.server_close()
