"""The ops HTTP endpoint (``ops.host``:``ops.port``): ``/healthz``, ``/readyz``,
``/metrics`` and the admin API under ``/api`` (``ops.admin``), served by uvicorn on a
thread of the gateway, routed by Starlette.

Probes answer 200 or 503 with a JSON body of findings; metrics are prometheus-client's
own ASGI app over the gateway's registry.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import uvicorn
from prometheus_client import make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from infergate.config import OpsSettings
from infergate.errors import ListenerError
from infergate.logs import get_logger
from infergate.ops import admin, page
from infergate.ops.health import Finding, Gateway, liveness, readiness
from infergate.ops.metrics import REGISTRY

log = get_logger(__name__)

# How long the endpoint may take to bind before start gives up.
_START_TIMEOUT_S = 10.0


def _answer(findings: list[Finding]) -> JSONResponse:
    failing = [f for f in findings if not f.ok]
    body = {
        "status": "ok" if not failing else "failing",
        "checks": [
            {"check": f.check, "ok": f.ok, **({"reason": f.reason} if f.reason else {})}
            for f in findings
        ],
    }
    return JSONResponse(body, status_code=200 if not failing else 503)


def app(gateway: Gateway) -> Starlette:
    def probe(check: Callable[[Gateway], list[Finding]]) -> Callable[[Request], JSONResponse]:
        def endpoint(request: Request) -> JSONResponse:  # sync: Starlette runs it on a thread
            return _answer(check(gateway))

        return endpoint

    return Starlette(
        routes=[
            Route("/", page.endpoint(gateway)),
            Route("/healthz", probe(liveness)),
            Route("/readyz", probe(readiness)),
            Mount("/metrics", make_asgi_app(registry=REGISTRY)),
            *admin.routes(gateway),
        ]
    )


class OpsServer:
    """uvicorn on a daemon thread; :meth:`start` returns once it listens."""

    def __init__(self, settings: OpsSettings, gateway: Gateway) -> None:
        config = uvicorn.Config(
            app(gateway),
            host=settings.host,
            port=settings.port,
            log_config=None,  # our logging, already configured
            access_log=False,
            lifespan="off",
        )
        self._settings = settings
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="ops", daemon=True)

    def start(self) -> None:
        """Raises :class:`ListenerError` when the port cannot be bound."""
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ListenerError(
                    f"the ops endpoint could not listen on {self._settings.host}:"
                    f"{self._settings.port} (in use?); set ops.port, or ops.enabled: false"
                )
            time.sleep(0.05)
        log.info("ops.listening", host=self._settings.host, port=self._settings.port)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5.0)
