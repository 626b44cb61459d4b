"""STOW-RS: a delivery's objects POSTed to a DICOMweb service in one request, each
answered on its own (PS3.18 10.5), through dicomweb-client.

The answer's classes are the C-STORE ones (``outcomes``): an object in the response's
Referenced SOP Sequence is stored (with a Warning Reason: a warning); one in its
Failed SOP Sequence has the class of its Failure Reason, a DIMSE status. A request
that fails as a whole is transient when the service may take it later (connection
refused or reset, a timeout, HTTP 408, 429 and 5xx) and permanent otherwise (HTTP 409
with no per-object answer, and any other 4xx: authentication refused, a URL that is
no STOW-RS service). As with C-STORE, nothing here raises for what the service does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from infergate.config import Destination
from infergate.export.outcomes import (
    AttemptOutcome,
    ObjectOutcome,
    OutcomeClass,
    classify_status,
    describe_status,
)
from infergate.export.scu import Outgoing, read_outgoing

_SOP_CLASS_NOT_SUPPORTED = 0x0122
# HTTP answers after which the same request may succeed later.
_TRANSIENT_HTTP = {408, 425, 429}


class _TrustingOnly(requests.Session):
    """A session that verifies the service's certificate against ``ca`` alone: a plain
    session's ``verify`` loses to REQUESTS_CA_BUNDLE in the environment."""

    def __init__(self, ca: str) -> None:
        super().__init__()
        self._ca = ca

    def merge_environment_settings(
        self, url: str | bytes | None, proxies: Any, stream: Any, verify: Any, cert: Any
    ) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        settings["verify"] = self._ca
        return settings


def _session(destination: Destination) -> requests.Session:
    session = requests.Session() if destination.ca is None else _TrustingOnly(str(destination.ca))
    if destination.username is not None and destination.password is not None:
        session.auth = (destination.username, destination.password.get_secret_value())
    if destination.bearer_token is not None:
        session.headers["Authorization"] = f"Bearer {destination.bearer_token.get_secret_value()}"
    return session


def _client(destination: Destination, timeout_s: float) -> DICOMwebClient:
    url = (destination.stow_url or "").rstrip("/")
    client = DICOMwebClient(url=url, session=_session(destination), timeout=timeout_s)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its backoff
    return client


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS response's data set (DICOM JSON), when it has one."""
    if response is None or not response.content:
        return None
    if "json" not in response.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError, json.JSONDecodeError):
        return None


def _per_object(
    answer: Dataset, outgoing: list[Outgoing], where: str
) -> tuple[list[ObjectOutcome], list[Outgoing]]:
    """Each object's outcome from the response; the objects it does not mention."""
    by_uid = {item.sop_instance_uid: item for item in outgoing}
    outcomes = []
    for item in answer.get("ReferencedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if by_uid.pop(uid, None) is None:
            continue
        warning = item.get("WarningReason")
        if warning is not None:
            code = int(warning)
            reason = f"stored by {where} with warning {describe_status(code)}"
            outcomes.append(ObjectOutcome(uid, OutcomeClass.WARNING, reason, code))
        else:
            outcomes.append(ObjectOutcome(uid, OutcomeClass.DELIVERED, f"stored by {where}"))
    for item in answer.get("FailedSOPSequence", []):
        uid = str(item.get("ReferencedSOPInstanceUID", ""))
        if by_uid.pop(uid, None) is None:
            continue
        code = int(item.get("FailureReason", 0xC000))
        reason = f"refused by {where}: {describe_status(code)}"
        # 0x0122 (SOP class not supported): it takes no such object at all, as a
        # presentation context refused in DICOM (a SEG then goes as Secondary Captures).
        unsupported = code == _SOP_CLASS_NOT_SUPPORTED
        outcomes.append(
            ObjectOutcome(uid, classify_status(code), reason, code, not_accepted=unsupported)
        )
    return outcomes, list(by_uid.values())


def _http_failure(exc: requests.RequestException, where: str) -> tuple[OutcomeClass, str]:
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        code = exc.response.status_code
        transient = code >= 500 or code in _TRANSIENT_HTTP
        return (
            OutcomeClass.TRANSIENT if transient else OutcomeClass.PERMANENT,
            f"{where} answered HTTP {code} {exc.response.reason}",
        )
    if isinstance(exc, requests.exceptions.SSLError):
        return OutcomeClass.PERMANENT, f"TLS with {where} failed: {type(exc).__name__}"
    if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
        return OutcomeClass.TRANSIENT, f"{where} did not answer: {type(exc).__name__}"
    return OutcomeClass.PERMANENT, f"STOW-RS to {where} failed: {type(exc).__name__}"


def _read(outgoing: list[Outgoing]) -> tuple[list[Dataset], list[ObjectOutcome]]:
    datasets: list[Dataset] = []
    unreadable: list[ObjectOutcome] = []
    for item in outgoing:
        try:
            datasets.append(pydicom.dcmread(item.path))
        except (OSError, InvalidDicomError) as exc:
            reason = f"{item.path.name} cannot be read: {type(exc).__name__}"
            unreadable.append(ObjectOutcome(item.sop_instance_uid, OutcomeClass.PERMANENT, reason))
    return datasets, unreadable


def stow_objects(
    objects: list[tuple[str, Path]], destination: Destination, timeout_s: float
) -> AttemptOutcome:
    """POST ``objects`` (SOP Instance UID, file) to ``destination``'s STOW-RS service
    in one request."""
    outcomes: list[ObjectOutcome] = []
    outgoing: list[Outgoing] = []
    for uid, path in objects:
        read = read_outgoing(uid, path)
        if isinstance(read, ObjectOutcome):
            outcomes.append(read)
        else:
            outgoing.append(read)
    datasets, unreadable = _read(outgoing)
    outcomes += unreadable
    failed = {o.sop_instance_uid for o in unreadable}
    outgoing = [item for item in outgoing if item.sop_instance_uid not in failed]
    if not outgoing:
        return AttemptOutcome(tuple(outcomes))
    where = destination.described
    answer: Dataset | None
    try:
        answer = _client(destination, timeout_s).store_instances(datasets)
    except requests.HTTPError as exc:
        # A 409 may still say, object by object, why (its Failed SOP Sequence).
        answer = _response_dataset(exc.response)
        if answer is None or "FailedSOPSequence" not in answer:
            return AttemptOutcome(tuple(outcomes), *_http_failure(exc, where))
    except requests.RequestException as exc:
        return AttemptOutcome(tuple(outcomes), *_http_failure(exc, where))
    except ValueError as exc:  # an answer that is no STOW-RS response
        return AttemptOutcome(
            tuple(outcomes), OutcomeClass.PERMANENT, f"{where} answered no STOW-RS response: {exc}"
        )
    answered, unmentioned = _per_object(answer, outgoing, where)
    outcomes += answered
    if unmentioned and not answer.get("ReferencedSOPSequence") and not answered:
        # 200 with an empty body: every object stored (some services answer so).
        outcomes += [
            ObjectOutcome(item.sop_instance_uid, OutcomeClass.DELIVERED, f"stored by {where}")
            for item in unmentioned
        ]
    else:
        outcomes += [
            ObjectOutcome(
                item.sop_instance_uid,
                OutcomeClass.PERMANENT,
                f"{where} did not say whether it stored the object",
            )
            for item in unmentioned
        ]
    return AttemptOutcome(tuple(outcomes))


def reach(destination: Destination, timeout_s: float) -> str | None:
    """Why ``destination``'s DICOMweb service cannot take results (it does not answer,
    or refuses our credentials), or None: a QIDO-RS query for one study, which a
    STOW-RS service that does not search may refuse with 4xx as long as it knows us."""
    where = destination.described
    try:
        _client(destination, timeout_s).search_for_studies(limit=1)
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        if code in (401, 403) or code >= 500:
            return _http_failure(exc, where)[1]
    except requests.RequestException as exc:
        return _http_failure(exc, where)[1]
    except ValueError:
        return None  # it answered, with something a search does not expect
    return None
