"""The JSON admin API under ``/api`` on the ops endpoint: what ``infergate jobs``,
``deliveries`` and ``studies`` show, and the two changes an operator makes (retry a
failed job, replay a dead letter).

Reading needs nothing; a change needs ``Authorization: Bearer <ops.token>``, and with
no token configured every change is refused. Answers name jobs, deliveries and
studies by their ids and UIDs, with states, times and reasons: the store holds no
patient data, so no answer can carry any.
"""

from __future__ import annotations

import dataclasses
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from infergate.config import Destination, Settings
from infergate.errors import InfergateError, NotFoundError, RefusedError
from infergate.logs import get_logger
from infergate.ops.health import Gateway
from infergate.work.states import JobState

log = get_logger(__name__)

_MAX_LIMIT = 1000


class BadRequestError(InfergateError):
    """A request's parameters cannot be used; the message says which."""


def _plain(value: Any) -> Any:
    """Dataclasses (and lists of them) as JSON-ready dictionaries."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _error(status: int, reason: str) -> JSONResponse:
    return JSONResponse({"error": reason}, status_code=status)


# A handler gets the request and its JSON body ({} for none) and runs on a worker
# thread (it reads the store); what it returns is the answer.
Handler = Callable[[Request, dict[str, Any]], Any]


def _answered(handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
    """``handler`` with its errors as HTTP answers: 400 for bad parameters, 404 for
    what is not there, 409 for what cannot be done now, 503 when the store cannot
    answer."""

    async def endpoint(request: Request) -> JSONResponse:
        try:
            body = await _body(request)
            answer = await run_in_threadpool(handler, request, body)
        except BadRequestError as exc:
            return _error(400, str(exc))
        except NotFoundError as exc:
            return _error(404, str(exc))
        except RefusedError as exc:
            return _error(409, str(exc))
        except InfergateError as exc:
            return _error(503, str(exc))
        return JSONResponse(_plain(answer))

    return endpoint


def _authorised(
    settings: Settings, handler: Callable[[Request], Awaitable[JSONResponse]]
) -> Callable[[Request], Awaitable[JSONResponse]]:
    """``handler`` only for a request that carries the configured token."""

    async def endpoint(request: Request) -> JSONResponse:
        token = settings.ops.token
        if token is None:
            log.warning("ops.change.refused", path=request.url.path, reason="no ops.token set")
            return _error(403, "state changes are turned off: ops.token is not set")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.encode(), token.get_secret_value().encode()
        ):
            log.warning("ops.change.refused", path=request.url.path, reason="wrong or no token")
            return JSONResponse(
                {"error": "this request changes state: it needs the ops token"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
        return await handler(request)

    return endpoint


def _limit(request: Request) -> int:
    return int(_number(request.query_params.get("limit", "100"), "limit", 1, _MAX_LIMIT))


def _number(text: str, name: str, low: float, high: float) -> float:
    try:
        value = float(text)
    except ValueError:
        raise BadRequestError(f"{name} must be a number, not {text!r}") from None
    if not low <= value <= high:
        raise BadRequestError(f"{name} must be between {low:g} and {high:g}")
    return value


def _destination(settings: Settings, ae_title: str | None) -> Destination | None:
    """The configured destination an operator named by its AE title (None: none
    named); only configured destinations, so a token cannot send results elsewhere."""
    if ae_title is None:
        return None
    for destination in settings.destinations():
        if destination.ae_title == ae_title:
            return destination
    known = ", ".join(sorted({d.ae_title for d in settings.destinations()})) or "none"
    raise BadRequestError(f"{ae_title!r} is not a configured destination (configured: {known})")


async def _body(request: Request) -> dict[str, Any]:
    if not await request.body():
        return {}
    try:
        body = await request.json()
    except ValueError:
        raise BadRequestError("the body is not JSON") from None
    if not isinstance(body, dict):
        raise BadRequestError("the body must be a JSON object")
    return body


def routes(gateway: Gateway) -> list[Route]:
    store, settings = gateway.store, gateway.settings

    def jobs(request: Request, _: dict[str, Any]) -> Any:
        query = request.query_params
        state = query.get("state")
        if state is not None and state not in {s.value for s in JobState}:
            raise BadRequestError(
                f"state must be one of {', '.join(s.value for s in JobState)}, not {state!r}"
            )
        since = query.get("since")
        return store.job_views(
            state=None if state is None else JobState(state),
            plugin=query.get("plugin"),
            since=None if since is None else _number(since, "since", 0, 1e11),
            study_uid=query.get("study"),
            limit=_limit(request),
        )

    def job(request: Request, _: dict[str, Any]) -> Any:
        return store.job_detail(request.path_params["job_id"])

    def retry(request: Request, _: dict[str, Any]) -> Any:
        job_id = request.path_params["job_id"]
        store.retry_failed_job(job_id, time.time())
        log.info("ops.job.retried", job_id=job_id)
        return {"job_id": job_id, "state": JobState.QUEUED.value}

    def send(request: Request, body: dict[str, Any]) -> Any:
        job_id = request.path_params["job_id"]
        to = _destination(settings, body.get("to"))
        if to is None:
            raise BadRequestError('send needs a destination: {"to": AE title}')
        delivery_id = store.send_job_results(job_id, to, settings.ingest.ae_title, time.time())
        log.info("ops.job.results_sent", job_id=job_id, to=to.ae_title, delivery_id=delivery_id)
        return {"job_id": job_id, "delivery_id": delivery_id}

    def deliveries(request: Request, _: dict[str, Any]) -> Any:
        dead = request.query_params.get("dead", "false").lower() in {"1", "true", "yes"}
        return store.delivery_views(dead_only=dead, limit=_limit(request))

    def delivery(request: Request, _: dict[str, Any]) -> Any:
        return store.delivery_view(request.path_params["delivery_id"])

    def replay(delivery_id: str, to: Destination | None) -> dict[str, str]:
        replay_id = store.replay_delivery(delivery_id, to, time.time())
        log.info(
            "ops.delivery.replayed",
            delivery_id=delivery_id,
            replay_id=replay_id,
            to=None if to is None else to.ae_title,
        )
        return {"delivery_id": delivery_id, "replayed_as": replay_id}

    def replay_one(request: Request, body: dict[str, Any]) -> Any:
        return replay(request.path_params["delivery_id"], _destination(settings, body.get("to")))

    def replay_dead(_: Request, body: dict[str, Any]) -> Any:
        to = _destination(settings, body.get("to"))  # a wrong name replays nothing
        return [
            replay(d.delivery_id, to)
            for d in store.delivery_views(dead_only=True, limit=_MAX_LIMIT)
        ]

    def studies(request: Request, _: dict[str, Any]) -> Any:
        return store.study_views(limit=_limit(request))

    def notifications(request: Request, _: dict[str, Any]) -> Any:
        dead = request.query_params.get("dead", "false").lower() in {"1", "true", "yes"}
        return store.notification_views(dead_only=dead, limit=_limit(request))

    def resend(request: Request, _: dict[str, Any]) -> Any:
        notification_id = request.path_params["notification_id"]
        store.resend_notification(notification_id, time.time())
        log.info("ops.notification.resent", notification_id=notification_id)
        return {"notification_id": notification_id, "state": "pending"}

    def nodes(_: Request, __: dict[str, Any]) -> Any:
        return store.node_views(time.time(), settings.work.lease_s)

    def forget(request: Request, _: dict[str, Any]) -> Any:
        node = request.path_params["node"]
        store.forget(node, time.time(), settings.work.lease_s)
        log.info("ops.node.forgotten", forgotten=node)
        return {"node": node, "forgotten": True}

    def change(handler: Handler) -> Callable[[Request], Awaitable[JSONResponse]]:
        return _authorised(settings, _answered(handler))

    return [
        Route("/api/jobs", _answered(jobs)),
        Route("/api/jobs/{job_id}", _answered(job)),
        Route("/api/jobs/{job_id}/retry", change(retry), methods=["POST"]),
        Route("/api/jobs/{job_id}/send", change(send), methods=["POST"]),
        Route("/api/deliveries", _answered(deliveries)),
        # Before /api/deliveries/{delivery_id}: "replay-dead" is not an id.
        Route("/api/deliveries/replay-dead", change(replay_dead), methods=["POST"]),
        Route("/api/deliveries/{delivery_id}", _answered(delivery)),
        Route("/api/deliveries/{delivery_id}/replay", change(replay_one), methods=["POST"]),
        Route("/api/studies", _answered(studies)),
        Route("/api/nodes", _answered(nodes)),
        Route("/api/nodes/{node}/forget", change(forget), methods=["POST"]),
        Route("/api/notifications", _answered(notifications)),
        Route("/api/notifications/{notification_id}/resend", change(resend), methods=["POST"]),
    ]
