"""A critical finding reaches people: a bleed on a head CT goes, besides its SEG and
SR, as an HL7 ORU^R01 to a real MLLP listener (python-hl7's), a FHIR DiagnosticReport
and a webhook to an HTTP receiver (uvicorn) that is down at first and comes back:
each exactly once, with no patient data in the gateway's log."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hl7
import hl7.mllp
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from infergate.testing import HeadPhantom
from peers import InfergateProcess, assert_no_patient_data, free_port, infergate_config, storescu

pytestmark = pytest.mark.integration


class _HttpReceiver:
    """A webhook endpoint and a FHIR server's DiagnosticReport endpoint, recording."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.received: list[dict[str, Any]] = []
        app = Starlette(
            routes=[
                Route("/hook", self._record, methods=["POST"]),
                Route("/fhir/DiagnosticReport", self._record, methods=["POST"]),
            ]
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="off")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    async def _record(self, request: Request) -> Response:
        body = json.loads(await request.body())
        self.received.append(
            {"path": request.url.path, "headers": dict(request.headers), "body": body}
        )
        if request.url.path == "/hook":
            return Response(status_code=204)
        return JSONResponse(body, status_code=201, media_type="application/fhir+json")

    def start(self) -> None:
        self._thread.start()
        while not self._server.started:
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(5)


class _MllpListener:
    """python-hl7's MLLP server on a loop of its own, acknowledging each message AA."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.messages: list[str] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    async def _client(
        self, reader: hl7.mllp.HL7StreamReader, writer: hl7.mllp.HL7StreamWriter
    ) -> None:
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                self.messages.append(str(message))
                writer.writemessage(message.create_ack())
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            hl7.mllp.start_hl7_server(self._client, "127.0.0.1", self.port)
        )
        self._ready.set()
        self._loop.run_forever()
        server.close()

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10)

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@pytest.fixture
def mllp() -> Iterator[_MllpListener]:
    listener = _MllpListener(free_port())
    listener.start()
    yield listener
    listener.stop()


def test_a_bleed_reaches_hl7_fhir_and_a_webhook_once_each_through_an_outage(
    tmp_path: Path, bleed_head: HeadPhantom, mllp: _MllpListener
) -> None:
    http = _HttpReceiver(free_port())  # not listening yet: down
    config = infergate_config(tmp_path / "var", None, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_head_bleed"]}
    base = f"http://127.0.0.1:{http.port}"
    config["notifications"] = {
        "retry_delay_s": 0.5,
        "max_retry_delay_s": 1.0,
        "receivers": [
            {"name": "ris", "kind": "hl7v2", "host": "127.0.0.1", "port": mllp.port},
            {"name": "ehr", "kind": "fhir", "url": f"{base}/fhir"},
            {"name": "pager", "kind": "webhook", "url": f"{base}/hook"},
        ],
    }
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(bleed_head.paths))
        (delivered,) = server.wait_event("notify.delivered", timeout=180, fail_on=())
        assert delivered["receiver"] == "ris"
        waiting = server.wait_event("notify.retrying", timeout=30, count=4, fail_on=())
        assert {e["receiver"] for e in waiting} == {"ehr", "pager"}
        http.start()  # back
        server.wait_event("notify.delivered", timeout=30, count=3, fail_on=("notify.dead_letter",))
        time.sleep(2.0)  # nothing more comes
        # What an operator sees: each notification, delivered, with the finding in words.
        status, body = server.http("/api/notifications")
        assert status == 200
        listed = json.loads(body)
        assert sorted((n["receiver"], n["state"]) for n in listed) == [
            ("ehr", "delivered"),
            ("pager", "delivered"),
            ("ris", "delivered"),
        ]
        assert {n["finding"] for n in listed} == {"Hemorrhage: Present"}
        assert_no_patient_data(body, bleed_head.identity)
    finally:
        server.stop()
        http.stop()
    assert len(mllp.messages) == 1
    oru = hl7.parse(mllp.messages[0])
    assert str(oru.segment("MSH")[9]).startswith("ORU^R01")
    assert str(oru.segment("OBX")[8]) == "AA"
    assert str(oru.segment("PID")[3]) == bleed_head.identity.patient_id
    paths = sorted(r["path"] for r in http.received)
    assert paths == ["/fhir/DiagnosticReport", "/hook"]
    fhir = next(r for r in http.received if r["path"].startswith("/fhir"))
    assert fhir["body"]["resourceType"] == "DiagnosticReport"
    assert fhir["headers"]["if-none-exist"].startswith("identifier=urn:dicom:uid|urn:oid:")
    hook = next(r for r in http.received if r["path"] == "/hook")
    assert hook["body"]["finding"]["value"]["display"] == "Present"
    assert hook["headers"]["idempotency-key"] == hook["body"]["id"]
    for received in http.received:
        assert bleed_head.identity.patient_name not in json.dumps(received["body"])
    assert bleed_head.identity.patient_name not in mllp.messages[0]
    assert_no_patient_data(server.log_text(), bleed_head.identity)
