"""The listener processes of ``infergate serve``: started, watched, restarted, stopped.

Python runs one thread at a time per process, so ingest uses more cores by running
``ingest.processes`` listener processes (``listener_process``) on one listening
socket that the pool binds before starting any (see ``sockets``). A bind error
therefore stops ``serve`` at once, with the port in the message. A listener that
dies is started again; the associations it held are ended in the audit trail, and
the instances it acknowledged are already committed.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from infergate.config import Settings
from infergate.dicom.tls import server_context
from infergate.errors import ListenerError
from infergate.ingest.metrics import child_environment, prepare_folder
from infergate.ingest.sockets import ListeningSockets
from infergate.logs import get_logger
from infergate.store import Store

log = get_logger(__name__)

READY_TIMEOUT_S = 60.0
# A listener that keeps dying is started again no more often than this.
RESTART_INTERVAL_S = 5.0


@dataclass
class _Listener:
    index: int
    process: subprocess.Popen[bytes]
    started_at: float


@dataclass
class _Launched:
    """A listener process started, not yet known to be ready."""

    index: int
    process: subprocess.Popen[bytes]
    ready_fd: int  # it writes b"1" here once it accepts connections


@dataclass
class ListenerPool:
    settings: Settings
    store: Store
    _sockets: ListeningSockets | None = field(init=False, default=None)
    _listeners: list[_Listener] = field(init=False, default_factory=list)

    @property
    def metrics_dir(self) -> Path:
        """Where the listener processes write their metrics (``ingest.metrics``)."""
        return self.settings.node_dir / "metrics"

    @property
    def pids(self) -> list[int]:
        return [listener.process.pid for listener in self._listeners]

    def start(self) -> None:
        """Bind the ports and start every listener; returns once all accept connections.

        Raises :class:`ListenerError` (a port cannot be bound, a listener does not start)
        or :class:`ConfigError` (the TLS certificate or key cannot be used).
        """
        ingest = self.settings.ingest
        if ingest.tls is not None:
            server_context(ingest.tls)  # a bad certificate stops start here, not in each child
        prepare_folder(self.metrics_dir)
        self._sockets = ListeningSockets.open(ingest)
        # All launched first, then awaited: they start (import, open the store) in
        # parallel.
        launched = [self._launch(i, self._sockets) for i in range(ingest.listener_processes)]
        failure: ListenerError | None = None
        for each in launched:
            if failure is not None:  # one failed: the others are not kept
                os.close(each.ready_fd)
                each.process.kill()
                each.process.wait()
                continue
            try:
                self._listeners.append(self._ready(each))
            except ListenerError as exc:
                failure = exc
        if failure is not None:
            self.stop()
            raise failure
        log.info("ingest.listeners.ready", processes=len(self._listeners), pids=self.pids)

    def _spawn(self, index: int, sockets: ListeningSockets) -> _Listener:
        return self._ready(self._launch(index, sockets))

    def _launch(self, index: int, sockets: ListeningSockets) -> _Launched:
        """Start listener ``index``, its settings on its stdin; not waiting for it."""
        ready_read, ready_write = os.pipe()
        arguments = ["--index", str(index), "--ready-fd", str(ready_write)]
        for flag, sock in (("--plain-fd", sockets.plain), ("--tls-fd", sockets.tls)):
            if sock is not None:
                arguments += [flag, str(sock.fileno())]
        try:
            process = subprocess.Popen(  # noqa: S603 - our own module, with our interpreter
                [sys.executable, "-m", "infergate.ingest.listener_process", *arguments],
                stdin=subprocess.PIPE,
                pass_fds=(ready_write, *(sock.fileno() for sock in sockets.all())),
                env=child_environment(self.metrics_dir),
            )
        finally:
            os.close(ready_write)
        if process.stdin is not None:  # always, with stdin=PIPE
            process.stdin.write(self.settings.for_child_process().encode())
            process.stdin.close()
        return _Launched(index, process, ready_read)

    def _ready(self, launched: _Launched) -> _Listener:
        """Wait for a launched listener to say it accepts connections; kill it and
        raise :class:`ListenerError` when it does not."""
        process = launched.process
        try:
            readable, _, _ = select.select([launched.ready_fd], [], [], READY_TIMEOUT_S)
            ready = bool(readable) and os.read(launched.ready_fd, 1) == b"1"
        finally:
            os.close(launched.ready_fd)
        if not ready:
            process.kill()
            process.wait()
            raise ListenerError(
                f"listener process {launched.index} did not start (exit code"
                f" {process.returncode}); its log lines above say why"
            )
        return _Listener(launched.index, process, time.monotonic())

    def alive(self) -> int:
        """Listener processes running now (bound to the listening sockets)."""
        if self._sockets is None:
            return 0
        return sum(1 for listener in self._listeners if listener.process.poll() is None)

    def watch(self) -> None:
        """Start again any listener that died; call it now and then."""
        for position, listener in enumerate(self._listeners):
            code = listener.process.poll()
            if code is None:
                continue
            if time.monotonic() - listener.started_at < RESTART_INTERVAL_S:
                continue  # a crash loop: try again after the interval
            ended = self.store.abandon_open_associations(
                "listener process died", time.time(), self.settings.node.name, listener.process.pid
            )
            log.error(
                "ingest.listener.died",
                listener=listener.index,
                pid=listener.process.pid,
                exit_code=code,
                associations_ended=ended,
            )
            if self._sockets is None:
                return
            try:
                self._listeners[position] = self._spawn(listener.index, self._sockets)
            except ListenerError as exc:
                log.error(
                    "ingest.listener.restart_failed", listener=listener.index, reason=str(exc)
                )
                listener.started_at = time.monotonic()
                continue
            log.warning("ingest.listener.restarted", listener=listener.index)

    def stop(self) -> None:
        """Ask every listener to finish its associations and exit; kill the ones that
        do not within the network timeout."""
        for listener in self._listeners:
            if listener.process.poll() is None:
                listener.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.ingest.network_timeout_s + 5
        for listener in self._listeners:
            try:
                listener.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("ingest.listener.killed", listener=listener.index)
                listener.process.kill()
                listener.process.wait()
        self._listeners = []
        if self._sockets is not None:
            self._sockets.close()
            self._sockets = None
