"""The Triton endpoints the gateway sends jobs to: which are ready, and whose turn it is.

One endpoint in the embedded default; with ``triton.mode: remote`` and ``triton.urls``,
several (the replicas of a Kubernetes Service, Triton hosts of their own). Each is
asked whether it is ready every ``triton.health_interval_s`` by the gateway's health
loop; jobs take the ready ones in turn. An endpoint that fails a job with
"unavailable" is skipped from then on, until it answers ready again; the job goes back
to the queue (``triton.unavailable_attempts``) and runs on another. Job processes get
the endpoint their job was given and make their own client of it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping

from infergate.config import TritonSettings
from infergate.inference.triton import TritonClient
from infergate.logs import get_logger

log = get_logger(__name__)


class Endpoints:
    """Clients of every configured Triton endpoint, their readiness, and the turn."""

    def __init__(self, clients: Mapping[str, TritonClient]) -> None:
        self._clients = dict(clients)
        self._lock = threading.Lock()
        # As of the last check; none is known ready before it.
        self._ready: set[str] = set()
        self._turn = 0

    @classmethod
    def for_settings(cls, settings: TritonSettings) -> Endpoints:
        """A client of each endpoint ``triton.*`` names."""
        return cls({url: TritonClient.for_endpoint(settings, url) for url in settings.endpoints})

    @classmethod
    def of(cls, client: TritonClient) -> Endpoints:
        """The one endpoint ``client`` talks to."""
        return cls({client.url: client})

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(self._clients)

    def client(self, url: str) -> TritonClient:
        return self._clients[url]

    def check(self) -> set[str]:
        """Ask each endpoint whether it is ready; log each that came up or went down.
        Returns the ready ones."""
        answers = {url: client.is_ready() for url, client in self._clients.items()}
        with self._lock:
            before, self._ready = self._ready, {url for url, ready in answers.items() if ready}
            ready = set(self._ready)
        for url in sorted(ready - before):
            log.info("triton.endpoint.ready", url=url)
        for url in sorted(before - ready):
            log.warning("triton.endpoint.down", url=url, reason="it does not answer ready")
        return ready

    def ready(self) -> tuple[str, ...]:
        """The endpoints ready at the last check (and not failed since), in order."""
        with self._lock:
            return tuple(url for url in self._clients if url in self._ready)

    def is_ready(self) -> bool:
        """Whether any endpoint is ready (as of the last check)."""
        with self._lock:
            return bool(self._ready)

    def pick(self) -> str:
        """The endpoint whose turn it is among the ready ones; when none is ready, among
        all of them (the job then fails as unavailable and is tried again later, or
        finds one back before the health loop does)."""
        with self._lock:
            ready = [url for url in self._clients if url in self._ready] or list(self._clients)
            url = ready[self._turn % len(ready)]
            self._turn += 1
        return url

    def failed(self, url: str, reason: str) -> None:
        """``url`` failed a job as unavailable: skipped until it answers ready again."""
        with self._lock:
            was_ready = url in self._ready
            self._ready.discard(url)
        if was_ready:
            log.warning("triton.endpoint.down", url=url, reason=reason)

    def model_ready(self, model: str, version: str = "") -> bool:
        """Whether ``model`` is ready on a ready endpoint."""
        return any(self._clients[url].model_ready(model, version) for url in self.ready())

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
