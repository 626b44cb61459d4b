"""STOW-RS answers and their classes, against a real HTTP server (uvicorn) that
answers as a DICOMweb service would: per-object failures, whole-request errors,
a bearer token."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import trustme
import uvicorn
from pydicom.dataset import Dataset
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infergate.config import Destination
from infergate.export.outcomes import OutcomeClass
from infergate.export.stow import reach, stow_objects
from infergate.testing import ChestPhantom
from peers import free_port

TOKEN = "stow-bearer-token-1234"  # noqa: S105 - the test service's own
WRONG = "a-wrong-bearer-token"


class _Service:
    """What the service answers next: ``mode`` names it."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []

    def _answer(self, uids: list[str]) -> Response:
        ds = Dataset()
        if self.mode == "ok":
            ds.ReferencedSOPSequence = [_ref(uid) for uid in uids]
            return JSONResponse(ds.to_json_dict(), 200, media_type="application/dicom+json")
        if self.mode == "mixed":  # stored, out of resources, refused
            ds.ReferencedSOPSequence = [_ref(uids[0], warning=0xB000)]
            ds.FailedSOPSequence = [_ref(uids[1], failure=0xA700), _ref(uids[2], failure=0xC000)]
            return JSONResponse(ds.to_json_dict(), 202, media_type="application/dicom+json")
        if self.mode == "unsupported":  # a service that stores no such SOP class
            ds.FailedSOPSequence = [_ref(uid, failure=0x0122) for uid in uids]
            return JSONResponse(ds.to_json_dict(), 409, media_type="application/dicom+json")
        if self.mode == "conflict":
            ds.FailedSOPSequence = [_ref(uid, failure=0xA900) for uid in uids]
            return JSONResponse(ds.to_json_dict(), 409, media_type="application/dicom+json")
        if self.mode == "unavailable":
            return Response("busy", 503)
        return Response("who are you", 404)

    async def studies(self, request: Request) -> Response:
        if request.headers.get("authorization") != f"Bearer {TOKEN}":
            return Response("no", 401)
        if request.method == "GET":
            return JSONResponse([], 200, media_type="application/dicom+json")
        body = await request.body()
        self.requests.append({"type": request.headers["content-type"], "size": len(body)})
        uids = [str(u) for u in _SENT]
        return self._answer(uids)


def _ref(uid: str, *, warning: int | None = None, failure: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    item.ReferencedSOPInstanceUID = uid
    if warning is not None:
        item.WarningReason = warning
    if failure is not None:
        item.FailureReason = failure
    return item


_SENT: list[str] = []


@contextlib.contextmanager
def _serving(answers: _Service, tls: tuple[str, str] | None = None) -> Iterator[str]:
    """The service on uvicorn (https with ``tls``: certificate and key files); its URL."""
    app = Starlette(routes=[Route("/web/studies", answers.studies, methods=["GET", "POST"])])
    port = free_port()
    certificate, key = tls or (None, None)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host="127.0.0.1",
            port=port,
            log_config=None,
            lifespan="off",
            ssl_certfile=certificate,
            ssl_keyfile=key,
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/web"
    server.should_exit = True
    thread.join(5)


@pytest.fixture(scope="module")
def service() -> Iterator[tuple[_Service, str]]:
    answers = _Service()
    with _serving(answers) as url:
        yield answers, url


def test_an_https_service_is_reached_through_the_configured_ca_and_no_other(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    ca, stranger = trustme.CA(), trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    certificate, key, trusted, untrusted = (
        tmp_path / n for n in ("c.pem", "k.pem", "ca.pem", "x.pem")
    )
    leaf.cert_chain_pems[0].write_to_path(str(certificate))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(trusted))
    stranger.cert_pem.write_to_path(str(untrusted))
    answers = _Service()
    with _serving(answers, (str(certificate), str(key))) as url:
        good = Destination.model_validate({"stow_url": url, "bearer_token": TOKEN, "ca": trusted})
        attempt = stow_objects(_objects(small_phantom, 1), good, 10.0)
        assert [o.outcome for o in attempt.objects] == [OutcomeClass.DELIVERED], attempt
        wrong = Destination.model_validate(
            {"stow_url": url, "bearer_token": TOKEN, "ca": untrusted}
        )
        attempt = stow_objects(_objects(small_phantom, 1), wrong, 10.0)
        assert attempt.failure is OutcomeClass.PERMANENT
        assert attempt.reason is not None
        assert "TLS" in attempt.reason


def _objects(phantom: ChestPhantom, count: int) -> list[tuple[str, Path]]:
    paths = sorted(phantom.paths)[:count]
    objects = [(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), p) for p in paths]
    _SENT[:] = [uid for uid, _ in objects]
    return objects


def test_each_object_gets_the_class_of_its_answer(
    service: tuple[_Service, str], small_phantom: ChestPhantom
) -> None:
    answers, url = service
    destination = Destination.model_validate({"stow_url": url, "bearer_token": TOKEN})
    assert reach(destination, 5.0) is None
    answers.mode = "ok"
    attempt = stow_objects(_objects(small_phantom, 2), destination, 10.0)
    assert attempt.failure is None
    assert [o.outcome for o in attempt.objects] == [OutcomeClass.DELIVERED] * 2
    assert answers.requests[-1]["type"].startswith("multipart/related")

    answers.mode = "mixed"
    attempt = stow_objects(_objects(small_phantom, 3), destination, 10.0)
    assert [(o.outcome, o.status) for o in attempt.objects] == [
        (OutcomeClass.WARNING, 0xB000),
        (OutcomeClass.TRANSIENT, 0xA700),
        (OutcomeClass.PERMANENT, 0xC000),
    ]

    answers.mode = "unsupported"  # its SOP class not stored there: like a refused context
    attempt = stow_objects(_objects(small_phantom, 1), destination, 10.0)
    assert [(o.outcome, o.not_accepted) for o in attempt.objects] == [
        (OutcomeClass.PERMANENT, True)
    ]

    answers.mode = "conflict"  # 409 with a Failed SOP Sequence: each object says why
    attempt = stow_objects(_objects(small_phantom, 1), destination, 10.0)
    assert [(o.outcome, o.status) for o in attempt.objects] == [(OutcomeClass.PERMANENT, 0xA900)]


@pytest.mark.parametrize(
    ("mode", "token", "expected", "reason"),
    [
        ("unavailable", TOKEN, OutcomeClass.TRANSIENT, "HTTP 503"),
        ("ok", WRONG, OutcomeClass.PERMANENT, "HTTP 401"),
        ("not-there", TOKEN, OutcomeClass.PERMANENT, "HTTP 404"),
    ],
)
def test_a_request_that_fails_as_a_whole_has_one_class(  # noqa: PLR0917 - parameters
    service: tuple[_Service, str],
    small_phantom: ChestPhantom,
    mode: str,
    token: str,
    expected: OutcomeClass,
    reason: str,
) -> None:
    answers, url = service
    answers.mode = mode
    if mode == "not-there":
        url = url.replace("/web", "/elsewhere")
    attempt = stow_objects(
        _objects(small_phantom, 1),
        Destination.model_validate({"stow_url": url, "bearer_token": token}),
        10.0,
    )
    assert (attempt.objects, attempt.failure) == ((), expected)
    assert attempt.reason is not None
    assert reason in attempt.reason
    assert token not in attempt.reason


def test_a_service_that_does_not_listen_is_transient(small_phantom: ChestPhantom) -> None:
    destination = Destination(stow_url=f"http://127.0.0.1:{free_port()}/dicom-web")
    attempt = stow_objects(_objects(small_phantom, 1), destination, 5.0)
    assert attempt.failure is OutcomeClass.TRANSIENT
    assert reach(destination, 5.0) is not None


def test_a_dicomweb_destination_is_checked_as_one() -> None:
    secret = "p"  # noqa: S105
    web = Destination.model_validate(
        {"stow_url": "https://pacs.example.org/dicom-web", "username": "u", "password": secret}
    )
    assert (web.ae_title, web.host, web.port, web.dicomweb) == (
        "pacs.example.org",
        "pacs.example.org",
        443,
        True,
    )
    assert "DICOMweb" in web.described
    assert "p" not in repr(web.password)
    for bad, why in (
        ({"stow_url": "ftp://pacs/dicom-web"}, "http or https"),
        ({"stow_url": "http://pacs/dw", "username": "u"}, "go together"),
        ({"stow_url": "http://pacs/dw", "host": "other"}, "no host or port"),
        ({"ae_title": "PACS", "host": "pacs", "port": 104, "username": "u"}, "only for"),
        ({"ae_title": "PACS"}, "ae_title, host and port, or a stow_url"),
    ):
        with pytest.raises(ValueError, match=why):
            Destination.model_validate(bad)
