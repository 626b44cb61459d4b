"""One listener process (``python -m infergate.ingest.listener_process``), started by the pool.

It reads the frozen settings as JSON on standard input (exactly the parent's, with
no second look at files or the environment), serves the listening socket it
inherited, says it is ready by writing one byte to the ready descriptor, and runs
until SIGTERM or SIGINT, or until its parent is gone. It imports only what ingest
needs: no Triton client, no imaging.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import threading

from infergate.config import Settings
from infergate.ingest.scp import StorageSCP
from infergate.ingest.sockets import ListeningSockets
from infergate.ingest.spool import Spool
from infergate.logs import configure_logging, get_logger
from infergate.store import Store

log = get_logger("infergate.ingest.listener_process")


def tmp_name(node: str, index: int) -> str:
    """The spool's ``tmp/`` folder of listener ``index`` of ``node`` (a spool on shared
    storage has the listeners of several nodes)."""
    return f"{node}/listener-{index}"


def _inherited(fd: int | None) -> socket.socket | None:
    if fd is None:
        return None
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)  # shared: the process that loses the race to accept moves on
    return sock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infergate-listener")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--plain-fd", type=int)
    parser.add_argument("--tls-fd", type=int)
    parser.add_argument("--ready-fd", type=int, required=True)
    args = parser.parse_args(argv)
    settings = Settings.model_validate_json(sys.stdin.read())
    configure_logging(settings.logging.level, form=settings.logging.format, node=settings.node.name)
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    store = Store(settings.storage.database, pool_size=settings.storage.database_pool_size)
    spool = Spool(settings.storage.spool_dir, tmp_name(settings.node.name, args.index))
    # A predecessor with this index died: what it was receiving was never acknowledged.
    orphans = spool.clean_orphans()
    if orphans:
        log.warning("ingest.spool.orphans_removed", files=orphans, listener=args.index)
    scp = StorageSCP(settings.ingest, spool, store, settings.node.name)
    scp.start(ListeningSockets(plain=_inherited(args.plain_fd), tls=_inherited(args.tls_fd)))
    os.write(args.ready_fd, b"1")
    os.close(args.ready_fd)
    while not stop.wait(0.5):
        if os.getppid() != parent:
            log.error("ingest.listener.orphaned", listener=args.index, reason="parent exited")
            break
    scp.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
