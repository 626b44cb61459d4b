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
from typing import Any

from pynetdicom.transport import ThreadedAssociationServer

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


class AdoptingServer(ThreadedAssociationServer):
    """pynetdicom's threaded server on a socket that is already listening.

    Takes the ``listening_socket`` keyword (passed through ``AE.make_server``) in place
    of binding one, and closes only its own descriptor on shutdown: pynetdicom's
    ``server_close`` shuts the socket down, which for a socket shared between processes
    would stop every process listening on it.
    """

    def __init__(self, *args: Any, listening_socket: socket.socket, **kwargs: Any) -> None:
        self._adopted = listening_socket
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        # socketserver made a fresh socket before calling this; use ours instead.
        self.socket.close()
        self.socket = self._adopted
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        """Already listening."""

    def server_close(self) -> None:
        self.socket.close()
