"""Sending one notification to one receiver, and what its answer means (the export's
classes): delivered, transient (try again later) or permanent (a dead letter).

HTTP (FHIR, webhook) through requests: 2xx delivered; connection errors, timeouts,
408, 425, 429 and 5xx transient; any other answer permanent. HL7 v2 over MLLP through
python-hl7's asyncio streams: the ACK's MSA-1 AA (or CA) delivered, AE (CE) an
application error, transient, AR (CR) a reject, permanent; no ACK in time transient.
Nothing here raises for what a receiver does.
"""

from __future__ import annotations

import asyncio
import json

import hl7
import hl7.mllp
import requests

from infergate.config import NotificationReceiver
from infergate.export.outcomes import OutcomeClass

_TRANSIENT_HTTP = {408, 425, 429}
Answer = tuple[OutcomeClass, str]


def _headers(receiver: NotificationReceiver, content_type: str) -> dict[str, str]:
    headers = {"Content-Type": content_type}
    if receiver.bearer_token is not None:
        headers["Authorization"] = f"Bearer {receiver.bearer_token.get_secret_value()}"
    return headers


def post(
    receiver: NotificationReceiver,
    url: str,
    body: str,
    *,
    content_type: str,
    extra_headers: dict[str, str],
    timeout_s: float,
) -> Answer:
    """POST ``body`` to ``url``; the class of the answer."""
    headers = {**_headers(receiver, content_type), **extra_headers}
    verify: bool | str = str(receiver.ca) if receiver.ca is not None else True
    try:
        answer = requests.post(
            url, data=body.encode(), headers=headers, timeout=timeout_s, verify=verify
        )
    except requests.exceptions.SSLError as exc:
        return OutcomeClass.PERMANENT, f"TLS with {receiver.name} failed: {type(exc).__name__}"
    except (requests.ConnectionError, requests.Timeout) as exc:
        return OutcomeClass.TRANSIENT, f"{receiver.name} did not answer: {type(exc).__name__}"
    except requests.RequestException as exc:
        return OutcomeClass.PERMANENT, f"POST to {receiver.name} failed: {type(exc).__name__}"
    code = answer.status_code
    if 200 <= code < 300:
        return OutcomeClass.DELIVERED, f"{receiver.name} answered HTTP {code}"
    transient = code >= 500 or code in _TRANSIENT_HTTP
    return (
        OutcomeClass.TRANSIENT if transient else OutcomeClass.PERMANENT,
        f"{receiver.name} answered HTTP {code} {answer.reason}",
    )


def post_json(
    receiver: NotificationReceiver, url: str, payload: object, key: str, timeout_s: float
) -> Answer:
    return post(
        receiver,
        url,
        json.dumps(payload),
        content_type="application/json",
        extra_headers={"Idempotency-Key": key},
        timeout_s=timeout_s,
    )


async def _exchange(host: str, port: int, message: str, timeout_s: float) -> hl7.Message:
    reader, writer = await asyncio.wait_for(
        hl7.mllp.open_hl7_connection(host, port), timeout=timeout_s
    )
    try:
        writer.writemessage(hl7.parse(message))
        await asyncio.wait_for(writer.drain(), timeout=timeout_s)
        return await asyncio.wait_for(reader.readmessage(), timeout=timeout_s)
    finally:
        writer.close()


def mllp(receiver: NotificationReceiver, message: str, timeout_s: float) -> Answer:
    """Send an HL7 v2 message over MLLP and read its ACK."""
    where = f"{receiver.name} at {receiver.host}:{receiver.port}"
    try:
        ack = asyncio.run(_exchange(receiver.host, receiver.port, message, timeout_s))
    except (TimeoutError, OSError, asyncio.IncompleteReadError) as exc:
        return OutcomeClass.TRANSIENT, f"{where} did not acknowledge: {type(exc).__name__}"
    except (hl7.ParseException, ValueError, KeyError, IndexError) as exc:
        return OutcomeClass.PERMANENT, f"{where} answered no HL7 ACK: {type(exc).__name__}"
    try:
        code = str(ack.segment("MSA")[1])
    except KeyError:
        return OutcomeClass.PERMANENT, f"{where} answered without an MSA segment"
    if code in ("AA", "CA"):
        return OutcomeClass.DELIVERED, f"{where} acknowledged ({code})"
    if code in ("AE", "CE"):
        return OutcomeClass.TRANSIENT, f"{where} answered an application error ({code})"
    return OutcomeClass.PERMANENT, f"{where} rejected the message ({code})"
