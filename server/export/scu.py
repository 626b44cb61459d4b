"""C-STORE SCU: one association to a destination carrying a delivery's objects, each
answered on its own (``outcomes`` says what each answer means).

Nothing here raises for what the destination does: a refused association, a SOP class
it did not accept, an abort mid-send or a failure status are outcomes, so that one
PACS can never stop the gateway.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from infergate.config import Destination
from infergate.dicom.tls import client_context
from infergate.errors import ConfigError
from infergate.export.outcomes import (
    AttemptOutcome,
    ObjectOutcome,
    OutcomeClass,
    classify_status,
    describe_status,
)

# Uncompressed data sets can be re-encoded in whichever of these the receiver accepts.
_UNCOMPRESSED = (str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian))
# C-STORE Priority (PS3.7 9.1.1.1.4).
_MEDIUM, _HIGH = 0x0000, 0x0001
# One association proposes at most 128 presentation contexts (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: Nagle's algorithm costs ~45 ms per message."""
    wrapper = event.assoc.dul.socket
    if wrapper is not None and wrapper.socket is not None:
        wrapper.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@dataclass(frozen=True)
class Outgoing:
    """An object to send: its file, and what its file meta says it is."""

    sop_instance_uid: str
    path: Path
    sop_class: str
    transfer_syntax: str

    @property
    def context_key(self) -> tuple[str, str]:
        """Uncompressed files share one context per SOP class (either little endian
        will do); a compressed one needs its own transfer syntax accepted as it is."""
        syntax = "" if self.transfer_syntax in _UNCOMPRESSED else self.transfer_syntax
        return (self.sop_class, syntax)

    @property
    def syntaxes(self) -> list[str]:
        return list(_UNCOMPRESSED) if self.context_key[1] == "" else [self.transfer_syntax]

    def describe(self) -> str:
        name = UID(self.sop_class).name
        return f"{name} ({self.sop_class}) in {UID(self.transfer_syntax).name}"


def read_outgoing(sop_instance_uid: str, path: Path) -> Outgoing | ObjectOutcome:
    """What ``path`` is, from its file meta; a file that cannot be read is a permanent
    outcome for that object (sending it again would not help)."""
    try:
        meta = read_file_meta_info(path)
    except (OSError, InvalidDicomError) as exc:
        return ObjectOutcome(
            sop_instance_uid, OutcomeClass.PERMANENT, f"{path.name} cannot be read: {exc}"
        )
    sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
    syntax = str(meta.get("TransferSyntaxUID", ""))
    if not sop_class or not syntax:
        return ObjectOutcome(
            sop_instance_uid,
            OutcomeClass.PERMANENT,
            f"{path.name} has no SOP class or transfer syntax in its file meta",
        )
    return Outgoing(sop_instance_uid, path, sop_class, syntax)


def send_objects(  # noqa: PLR0911 - each early return is one way an association fails
    objects: list[tuple[str, Path]],
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    *,
    urgent: bool = False,
) -> AttemptOutcome:
    """C-STORE ``objects`` (SOP Instance UID, file) to ``destination`` in one
    association, with priority HIGH when ``urgent`` and MEDIUM otherwise."""
    outcomes: list[ObjectOutcome] = []
    outgoing: list[Outgoing] = []
    for uid, path in objects:
        read = read_outgoing(uid, path)
        (outcomes if isinstance(read, ObjectOutcome) else outgoing).append(read)  # type: ignore[arg-type]
    if not outgoing:
        return AttemptOutcome(tuple(outcomes))
    contexts = {item.context_key: item.syntaxes for item in outgoing}
    where = destination.described
    if len(contexts) > _MAX_CONTEXTS:
        return AttemptOutcome(
            tuple(outcomes),
            OutcomeClass.PERMANENT,
            f"{len(contexts)} presentation contexts needed for one association;"
            f" at most {_MAX_CONTEXTS}",
        )
    assoc = _associate(destination, calling_ae, contexts, timeout_s, where)
    if isinstance(assoc, tuple):
        return AttemptOutcome(tuple(outcomes), *assoc)
    if not assoc.is_established:
        refused = _refusal(assoc, where, outgoing, destination, timeout_s)
        if isinstance(refused, list):
            return AttemptOutcome(tuple(outcomes + refused))
        return AttemptOutcome(tuple(outcomes), *refused)
    try:
        priority = _HIGH if urgent else _MEDIUM
        for message_id, item in enumerate(outgoing, start=1):
            if not _accepted(assoc, item):
                outcomes.append(
                    ObjectOutcome(
                        item.sop_instance_uid,
                        OutcomeClass.PERMANENT,
                        f"destination {where} did not accept {item.describe()}",
                        not_accepted=True,
                    )
                )
                continue
            answered = _store(assoc, item, message_id, priority, where)
            if isinstance(answered, AttemptOutcome):
                return AttemptOutcome(tuple(outcomes), answered.failure, answered.reason)
            outcomes.append(answered)
    finally:
        if assoc.is_established:
            assoc.release()
    return AttemptOutcome(tuple(outcomes))


def echo(destination: Destination, calling_ae: str, timeout_s: float) -> str | None:
    """C-ECHO ``destination``: None when it answered success, else why not (refused,
    no answer, a status other than success)."""
    where = destination.described
    syntaxes: list[str] = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    assoc = _associate(destination, calling_ae, {(Verification, ""): syntaxes}, timeout_s, where)
    if isinstance(assoc, tuple):
        return assoc[1]
    if not assoc.is_established:
        refused = _refusal(assoc, where, [], destination, timeout_s)
        if isinstance(refused, list):  # no context accepted: none is named
            return f"destination {where} did not accept Verification"
        return refused[1]
    try:
        status = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    code = int(status.Status) if status is not None and "Status" in status else None
    if code is None:
        return f"destination {where} gave no C-ECHO response"
    if code != 0:
        return f"destination {where} answered the C-ECHO with {describe_status(code)}"
    return None


def _associate(
    destination: Destination,
    calling_ae: str,
    contexts: dict[tuple[str, str], list[str]],
    timeout_s: float,
    where: str,
) -> Association | tuple[OutcomeClass, str]:
    """An association requested with ``contexts`` (over TLS when the destination has
    it), established or not; a failure before any answer as its class and reason."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for (sop_class, _), syntaxes in contexts.items():
        ae.add_requested_context(sop_class, syntaxes)
    tls = destination.tls
    try:
        tls_args = (
            None if tls is None else (client_context(tls), tls.server_name or destination.host)
        )
    except ConfigError as exc:
        return OutcomeClass.PERMANENT, str(exc)
    try:
        assoc: Association = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
            tls_args=tls_args,
        )
    except (OSError, RuntimeError, ValueError) as exc:
        return OutcomeClass.TRANSIENT, f"cannot associate with {where}: {exc}"
    return assoc


def _store(
    assoc: Association, item: Outgoing, message_id: int, priority: int, where: str
) -> ObjectOutcome | AttemptOutcome:
    """One C-STORE: the object's outcome, or the association's failure."""
    try:
        ds = pydicom.dcmread(item.path)
    except (OSError, InvalidDicomError) as exc:
        return ObjectOutcome(
            item.sop_instance_uid, OutcomeClass.PERMANENT, f"{item.path.name}: {exc}"
        )
    try:
        status = assoc.send_c_store(ds, msg_id=message_id, priority=priority)
    except (OSError, RuntimeError, ValueError) as exc:
        return AttemptOutcome((), OutcomeClass.TRANSIENT, f"sending to {where} failed: {exc}")
    code = int(status.Status) if status is not None and "Status" in status else None
    if code is None:
        what = "aborted the association" if assoc.is_aborted else "gave no C-STORE response"
        return AttemptOutcome(
            (), OutcomeClass.TRANSIENT, f"destination {where} {what} during {item.path.name}"
        )
    outcome = classify_status(code)
    return ObjectOutcome(
        item.sop_instance_uid,
        outcome,
        f"destination {where} answered {describe_status(code)}",
        status=code,
    )


def _why_no_answer(destination: Destination, timeout_s: float) -> str:
    """Why an association got no answer, found by connecting once more: pynetdicom's
    transport only logs the reason (connection refused, a certificate that fails
    verification) on a thread of its own."""
    try:
        with socket.create_connection(
            (destination.host, destination.port), timeout=min(timeout_s, 10)
        ) as sock:
            if destination.tls is not None:
                name = destination.tls.server_name or destination.host
                with client_context(destination.tls).wrap_socket(sock, server_hostname=name):
                    pass
    except (OSError, ConfigError) as exc:
        return str(exc)
    return "the connection was closed, aborted or timed out"


def _accepted(assoc: Association, item: Outgoing) -> bool:
    return any(
        cx.abstract_syntax == item.sop_class and cx.transfer_syntax[0] in item.syntaxes
        for cx in assoc.accepted_contexts
    )


def _refusal(
    assoc: Association,
    where: str,
    outgoing: list[Outgoing],
    destination: Destination,
    timeout_s: float,
) -> tuple[OutcomeClass, str] | list[ObjectOutcome]:
    """Why no association was established: its class and reason, or, when the
    destination accepted none of the presentation contexts, a permanent outcome for
    each object."""
    if assoc.is_rejected:
        primitive = assoc.acceptor.primitive
        permanent = primitive is not None and primitive.result == 0x01
        detail = (
            "rejected the association"
            if primitive is None
            else f"rejected the association ({primitive.result_str}, source"
            f" {primitive.source_str}: {primitive.reason_str})"
        )
        return (
            OutcomeClass.PERMANENT if permanent else OutcomeClass.TRANSIENT,
            f"destination {where} {detail}",
        )
    if assoc.rejected_contexts and not assoc.accepted_contexts:
        return [
            ObjectOutcome(
                item.sop_instance_uid,
                OutcomeClass.PERMANENT,
                f"destination {where} did not accept {item.describe()}",
                not_accepted=True,
            )
            for item in outgoing
        ]
    if assoc.acceptor.primitive is None:
        why = _why_no_answer(destination, timeout_s)
        return (OutcomeClass.TRANSIENT, f"destination {where} gave no A-ASSOCIATE response ({why})")
    return (OutcomeClass.TRANSIENT, f"destination {where} aborted the association")
