"""The command line's side of the admin API: JSON over HTTP to the running gateway's
ops endpoint, found from the same settings the gateway was started with."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from infergate.config import OpsSettings
from infergate.errors import OpsClientError

_TIMEOUT_S = 30.0


def local_address(host: str) -> str:
    """Where this machine reaches a server of its own bound to ``host``: loopback for
    one listening on every address."""
    return "127.0.0.1" if host in {"0.0.0.0", "::", ""} else host  # noqa: S104


class OpsClient:
    def __init__(self, settings: OpsSettings) -> None:
        if not settings.enabled:
            raise OpsClientError(
                "the ops endpoint is turned off (ops.enabled: false): there is no gateway to ask"
            )
        # A gateway listening on every address is reached on loopback.
        host = local_address(settings.host)
        if ":" in host:
            host = f"[{host}]"
        self.base_url = f"http://{host}:{settings.port}"
        self._token = settings.token

    def probe(self, path: str) -> tuple[int, Any]:
        """GET a probe (``/readyz``, ``/healthz``): its status and JSON body, 503 too."""
        request = urllib.request.Request(self.base_url + path)  # noqa: S310 - http://
        try:
            return 200, self._call(request, answer_503=True)
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def get(self, path: str) -> Any:
        return self._call(urllib.request.Request(self.base_url + path))  # noqa: S310 - http://

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        request = urllib.request.Request(  # noqa: S310 - base_url is http:// we made
            self.base_url + path,
            data=json.dumps(body or {}).encode(),
            headers=headers,
            method="POST",
        )
        return self._call(request)

    def _call(self, request: urllib.request.Request, *, answer_503: bool = False) -> Any:
        try:
            with urllib.request.urlopen(request, timeout=_TIMEOUT_S) as answer:  # noqa: S310 - http only
                return json.loads(answer.read())
        except urllib.error.HTTPError as error:
            if answer_503 and error.code == 503:  # a probe's "not ready", for the caller
                raise
            raise OpsClientError(_reason(error.code, error.read(), error.reason)) from None
        except (OSError, ValueError) as exc:
            raise OpsClientError(
                f"no answer from the gateway's ops endpoint at {self.base_url} ({exc});"
                " is `infergate serve` running with these settings?"
            ) from None


def _reason(status: int, body: bytes, fallback: str) -> str:
    try:
        reason = json.loads(body).get("error")
    except (ValueError, AttributeError):
        reason = None
    return f"the gateway answered {status}: {reason or fallback}"
