"""One inbound association, from its A-ASSOCIATE-RQ to its release or abort.

Infergate runs the acceptor side of the upper layer itself, one thread per
connection reading whole PDUs with a timeout. pynetdicom still decodes the
A-ASSOCIATE-RQ and encodes the A-ASSOCIATE-AC (``pynetdicom.pdu``) and negotiates
presentation contexts (``negotiate_as_acceptor``); Infergate's exports use its
requestor. pynetdicom's own acceptor runs two threads per association that poll
every millisecond, and builds, validates and encodes a pydicom Dataset for every
command set: in a profile that was most of ingest's CPU, and it kept ingest below
Orthanc's throughput however many processes served it (README, "Performance").

What an association does with what it receives is the ``Services`` it is given:
admission, the C-ECHO and C-STORE services, and the record of its end.
"""

from __future__ import annotations

import contextlib
import errno
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog
from pydicom.uid import UID
from pynetdicom import pdu as pynetdicom_pdu
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from infergate.dicom.status import Status
from infergate.errors import AssociationError, PduTooLargeError
from infergate.ingest.admission import (
    CALLED_AE_NOT_RECOGNISED,
    CALLING_AE_NOT_RECOGNISED,
    PERMANENT,
    SERVICE_PROVIDER_ACSE,
    SERVICE_USER,
    Rejection,
)
from infergate.ingest.dimse import (
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    decode_command,
    encode_response,
)
from infergate.ingest.incoming import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    IncomingFile,
    file_meta,
)
from infergate.ingest.upper_layer import (
    A_ABORT,
    A_ASSOCIATE_RJ,
    A_ASSOCIATE_RQ,
    A_RELEASE_RQ,
    ABORT_BY_PROVIDER,
    COMMAND,
    INVALID_PARAMETER_VALUE,
    LAST,
    P_DATA_TF,
    REASON_NOT_SPECIFIED,
    RELEASE_RP,
    UNEXPECTED_PDU,
    Connection,
    PeerClosedError,
    pdata,
    pdu,
    pdvs,
)
from infergate.logs import get_logger

log = get_logger(__name__)

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
# PS3.8 9.3.4 diagnostics beside admission's own.
APPLICATION_CONTEXT_NOT_SUPPORTED, PROTOCOL_VERSION_NOT_SUPPORTED = 0x02, 0x02


@dataclass
class AssociationInfo:
    """What is known of one association: for admission, the audit and the logs."""

    peer_address: str
    peer_port: int
    tls: bool = False
    tls_subject: str | None = None
    association_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    calling_ae: str = ""
    called_ae: str = ""
    requested: bool = False  # an A-ASSOCIATE-RQ arrived
    instances: int = 0
    bytes: int = 0
    failures: int = 0


def peer_fields(info: AssociationInfo) -> dict[str, object]:
    """The peer's address and AE titles, as association log events carry them."""
    return {
        "peer_address": info.peer_address,
        "peer_port": info.peer_port,
        "calling_ae": info.calling_ae,
        "called_ae": info.called_ae,
    }


@dataclass(frozen=True)
class ReceivedInstance:
    """A whole dataset received for a C-STORE request, in a file under ``tmp/``."""

    path: Path
    size: int  # of the file: preamble, file meta and dataset
    sha256: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID


class Services(Protocol):
    """What the listener does for an association."""

    def admit(self, info: AssociationInfo, refused: Rejection | None) -> Rejection | None:
        """Decide (or, when the request was ``refused`` already, record) the request."""
        ...

    def echo(self, info: AssociationInfo) -> int: ...

    def store_instance(
        self, info: AssociationInfo, instance: ReceivedInstance
    ) -> tuple[int, str | None]:
        """The status for the instance, and an error comment for a failure."""
        ...

    def closed(self, info: AssociationInfo, outcome: str, reason: str | None) -> None:
        """The association ended: ``released``, ``aborted`` or ``rejected``."""
        ...


@dataclass(frozen=True)
class _Context:
    """An accepted presentation context, as plain values (pynetdicom's properties
    build a new UID object on every access)."""

    abstract_syntax: str
    transfer_syntax: UID


@dataclass
class _Pending:
    """A request whose command has arrived and whose dataset is arriving."""

    command: Command
    context_id: int
    file: IncomingFile | None  # None: the dataset is read and dropped
    write_error: OSError | None = None  # the file could not be written: answered with it


class InboundAssociation:
    """Runs one association on ``connection`` to its end (``run`` returns then)."""

    def __init__(
        self,
        connection: Connection,
        info: AssociationInfo,
        *,
        services: Services,
        contexts: list[PresentationContext],
        acse_timeout_s: float,
        tmp_dir: Path,
    ) -> None:
        self.connection = connection
        self.info = info
        self.services = services
        self.contexts = contexts
        self.acse_timeout_s = acse_timeout_s
        self.tmp_dir = tmp_dir
        self._accepted: dict[int, _Context] = {}
        self._peer_max_pdu = 0
        self._command = bytearray()
        self._pending: _Pending | None = None
        self._admitted = False

    def run(self) -> None:
        try:
            try:
                outcome, reason = self._run()
            except Exception as exc:  # a bug here must not leave the association open
                log.exception("ingest.association.error", error=type(exc).__name__)
                self.connection.send_abort(ABORT_BY_PROVIDER, REASON_NOT_SPECIFIED)
                reason = f"internal error ({type(exc).__name__})"
                outcome = "aborted" if self._admitted else None
            if self._drop_pending():
                log.warning("ingest.instance.incomplete", files_removed=1)
            if outcome is not None:
                self.services.closed(self.info, outcome, reason)
            if outcome == "released":  # answered once the end is on record
                with contextlib.suppress(OSError):  # a peer that did not wait for it
                    self.connection.send(RELEASE_RP)
        finally:
            self._drop_pending()
            self.connection.close()

    def _run(self) -> tuple[str | None, str | None]:
        """The outcome to record (None for a connection that never asked to associate)."""
        try:
            # The whole request within acse_timeout_s: a peer that drips it a byte at a
            # time never lets one read time out.
            pdu_type, body = self.connection.read_pdu(
                self.acse_timeout_s, whole_within_s=self.acse_timeout_s
            )
        except (OSError, AssociationError) as exc:
            self._connection_failed(exc, before_request=True)
            return None, None
        if pdu_type != A_ASSOCIATE_RQ:
            self.connection.send_abort(ABORT_BY_PROVIDER, UNEXPECTED_PDU)
            log.warning(
                "ingest.connection.failed",
                peer_address=self.info.peer_address,
                reason=f"first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ",
            )
            return None, None
        try:
            if not self._associate(body):
                return "rejected", None
        except (OSError, AssociationError) as exc:  # a malformed request, or the peer left
            reason = self._connection_failed(exc, before_request=False)
            return ("aborted", reason) if self._admitted else (None, None)
        return self._serve()

    def _associate(self, body: memoryview) -> bool:
        """Decide and answer the request; True when it was accepted."""
        blank = _blank_ae_titles(body)
        if blank is not None:
            self.info.requested = True
            return self._reject(self.services.admit(self.info, blank) or blank)
        request = pynetdicom_pdu.A_ASSOCIATE_RQ()
        try:
            request.decode(pdu(A_ASSOCIATE_RQ, bytes(body)))
            primitive = request.to_primitive()
        except Exception as exc:  # pynetdicom raises anything on a malformed PDU
            raise AssociationError(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__})") from exc
        self.info.calling_ae = str(primitive.calling_ae_title or "").strip()
        self.info.called_ae = str(primitive.called_ae_title or "").strip()
        self.info.requested = True
        rejection = self.services.admit(self.info, self._protocol_rejection(request))
        if rejection is not None:
            return self._reject(rejection)
        self._admitted = True  # on record as open from here: its end must be recorded too
        self._peer_max_pdu = int(primitive.maximum_length_received or 0)
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in primitive.user_information
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid
        }
        results, role_replies = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, self.contexts, roles or None
        )
        self._accepted = {
            cx.context_id: _Context(str(cx.abstract_syntax), UID(str(cx.transfer_syntax[0])))
            for cx in results
            if cx.result == 0 and cx.context_id
        }
        self.connection.send(self._accept_pdu(primitive, results, role_replies))
        log.info(
            "ingest.association.accepted",
            **peer_fields(self.info),
            **({"tls": True, "tls_subject": self.info.tls_subject} if self.info.tls else {}),
        )
        return True

    def _reject(self, rejection: Rejection) -> bool:
        """Answer an A-ASSOCIATE-RJ that admission decided and audited."""
        answer = bytes([0, rejection.result, rejection.source, rejection.diagnostic])
        self.connection.send(pdu(A_ASSOCIATE_RJ, answer))
        return False

    @staticmethod
    def _protocol_rejection(request: pynetdicom_pdu.A_ASSOCIATE_RQ) -> Rejection | None:
        if not request.protocol_version & 0x01:
            return Rejection(
                PERMANENT,
                SERVICE_PROVIDER_ACSE,
                PROTOCOL_VERSION_NOT_SUPPORTED,
                "the requested protocol version is not supported",
            )
        if str(request.application_context_name) != APPLICATION_CONTEXT:
            return Rejection(
                PERMANENT,
                SERVICE_USER,
                APPLICATION_CONTEXT_NOT_SUPPORTED,
                "the application context name is not DICOM's",
            )
        return None

    def _accept_pdu(
        self,
        request: A_ASSOCIATE,
        results: list[PresentationContext],
        role_replies: list[SCP_SCU_RoleSelectionNegotiation],
    ) -> bytes:
        accept = A_ASSOCIATE()
        accept.application_context_name = UID(APPLICATION_CONTEXT)
        accept.calling_ae_title = request.calling_ae_title
        accept.called_ae_title = request.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        maximum = MaximumLengthNotification()
        maximum.maximum_length_received = self.connection.limits.pdata_bytes
        implementation = ImplementationClassUIDNotification()
        implementation.implementation_class_uid = UID(IMPLEMENTATION_CLASS_UID)
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        accept.user_information = [maximum, implementation, version, *role_replies]
        encoded = pynetdicom_pdu.A_ASSOCIATE_AC()
        encoded.from_primitive(accept)
        return bytes(encoded.encode())

    # -- established ------------------------------------------------------------------

    def _serve(self) -> tuple[str, str | None]:
        while True:
            try:
                pdu_type, body = self.connection.read_pdu(self.connection.timeout_s)
                if pdu_type == P_DATA_TF:
                    self._receive(body)
                    continue
            except (OSError, AssociationError) as exc:
                return "aborted", self._connection_failed(exc, before_request=False)
            if pdu_type == A_RELEASE_RQ:
                return "released", None
            if pdu_type == A_ABORT:
                return "aborted", None
            self.connection.send_abort(ABORT_BY_PROVIDER, UNEXPECTED_PDU)
            return "aborted", f"unexpected PDU of type 0x{pdu_type:02X}"

    def _connection_failed(self, exc: Exception, *, before_request: bool) -> str:
        """Log why the connection ends and abort it if it is still there; the reason."""
        if isinstance(exc, TimeoutError):
            reason = "no data from the peer within the timeout"
        else:
            reason = str(exc) or type(exc).__name__
        if isinstance(exc, PduTooLargeError):
            log.warning(
                "ingest.pdu.refused",
                peer_address=self.info.peer_address,
                pdu_type=f"0x{exc.pdu_type:02X}",
                declared_bytes=exc.declared,
                limit_bytes=exc.limit,
                reason="declared PDU length over the limit; connection closed",
            )
        gone = isinstance(exc, PeerClosedError) or (
            isinstance(exc, OSError) and not isinstance(exc, TimeoutError)
        )
        if not gone and not before_request:  # before a request there is nothing to abort
            self.connection.send_abort(ABORT_BY_PROVIDER, INVALID_PARAMETER_VALUE)
        if before_request and (gone or isinstance(exc, TimeoutError)):
            # A health check or a port scan: connected, sent nothing, left or idled.
            log.info("ingest.connection.closed", peer_address=self.info.peer_address, reason=reason)
        else:
            log.warning(
                "ingest.connection.failed", peer_address=self.info.peer_address, reason=reason
            )
        return reason

    def _receive(self, body: memoryview) -> None:
        for context_id, control, data in pdvs(body):
            if context_id not in self._accepted:
                raise AssociationError(f"PDV for presentation context {context_id}, not accepted")
            pending = self._pending
            if control & COMMAND:
                if pending is not None:
                    raise AssociationError("a command arrived before the previous data set ended")
                if len(self._command) + len(data) > MAX_COMMAND_SET_BYTES:
                    raise AssociationError(
                        f"command set over {MAX_COMMAND_SET_BYTES} bytes without its last fragment"
                    )
                self._command += data
                if control & LAST:
                    command = decode_command(self._command)
                    self._command = bytearray()
                    self._begin(command, context_id)
            else:
                if pending is None or pending.context_id != context_id:
                    raise AssociationError("a data set fragment arrived without its command")
                if pending.file is not None:
                    self._write(pending, data)
                if control & LAST:
                    self._pending = None
                    self._answer(pending)

    def _begin(self, command: Command, context_id: int) -> None:
        if command.is_response:
            raise AssociationError(
                f"a response (command 0x{command.field:04X}) sent to the acceptor"
            )
        if command.field == C_CANCEL_RQ:
            return
        if not command.has_dataset:
            self._answer(_Pending(command, context_id, None))
            return
        incoming = None
        if command.field == C_STORE_RQ:
            context = self._accepted[context_id]
            meta = file_meta(
                command.sop_class_uid,
                command.sop_instance_uid,
                context.transfer_syntax,
                self.info.calling_ae,
            )
            try:
                incoming = IncomingFile(self.tmp_dir, meta)
            except OSError as exc:  # no room, or the spool is gone: answered at the end
                self._pending = _Pending(command, context_id, None, exc)
                return
        self._pending = _Pending(command, context_id, incoming)

    @staticmethod
    def _write(pending: _Pending, data: memoryview) -> None:
        """Write a fragment; if the file cannot take it, drop the file and read the rest
        of the dataset into nowhere, to answer with a status instead of an abort."""
        if pending.file is None:
            return
        try:
            pending.file.write(data)
        except OSError as exc:
            pending.file.discard()
            pending.file, pending.write_error = None, exc

    def _answer(self, pending: _Pending) -> None:
        command = pending.command
        context = self._accepted[pending.context_id]
        comment: str | None = None
        if command.field == C_ECHO_RQ and context.abstract_syntax == VERIFICATION:
            status = self.services.echo(self.info)
        elif command.field == C_STORE_RQ and pending.file is not None:
            status, comment = self._store(pending.file, command, context)
        elif command.field == C_STORE_RQ and pending.write_error is not None:
            status, comment = self._unwritable(pending.write_error)
        elif command.field == C_STORE_RQ:
            status, comment = Status.CANNOT_UNDERSTAND, "C-STORE without a data set"
        else:
            status, comment = (
                Status.UNRECOGNIZED_OPERATION,
                "operation not supported by this listener",
            )
        response = encode_response(command, status, comment)
        for message in pdata(pending.context_id, COMMAND, response, self._peer_max_pdu):
            self.connection.send(message)

    def _unwritable(self, exc: OSError) -> tuple[int, str]:
        self.info.failures += 1
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        status = Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE
        reason = f"the spool could not take the data set: {exc.strerror or exc}"
        log.warning(
            "ingest.instance.refused",
            reason=reason,
            error=type(exc).__name__,
            status=f"0x{int(status):04X}",
        )
        return status, reason

    def _store(
        self, file: IncomingFile, command: Command, context: _Context
    ) -> tuple[int, str | None]:
        digest = file.finish()
        if command.sop_class_uid != context.abstract_syntax:
            file.discard()
            self.info.failures += 1
            return Status.SOP_CLASS_NOT_SUPPORTED, "SOP class differs from the presentation context"
        try:
            instance = ReceivedInstance(
                path=file.path,
                size=file.size,
                sha256=digest,
                sop_class_uid=command.sop_class_uid,
                sop_instance_uid=command.sop_instance_uid,
                transfer_syntax=context.transfer_syntax,
            )
            status, comment = self.services.store_instance(self.info, instance)
        except BaseException:
            file.discard()
            raise
        if status != Status.SUCCESS:  # refused before the spool took it (success moved it)
            file.discard()
        return status, comment

    def _drop_pending(self) -> bool:
        """Remove the file of a dataset cut off mid-way; True if there was one."""
        pending, self._pending = self._pending, None
        if pending is None or pending.file is None:
            return False
        pending.file.discard()
        return True


def _blank_ae_titles(body: memoryview) -> Rejection | None:
    """A request whose called or calling AE title is all spaces (PS3.8 9.3.2: each is
    16 bytes after the protocol version): rejected for good, naming which, instead of
    failing to decode."""
    if len(body) < _AE_TITLES_END:
        return None
    called, calling = bytes(body[4:20]), bytes(body[20:36])
    if not calling.strip(b" \0"):
        return Rejection(
            PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED, "the calling AE title is blank"
        )
    if not called.strip(b" \0"):
        return Rejection(
            PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNISED, "the called AE title is blank"
        )
    return None


# A command set is a few hundred bytes (a C-STORE-RQ with a Move Originator is under
# 300); fragments that never end would otherwise pile up without limit.
MAX_COMMAND_SET_BYTES = 16384
# An A-ASSOCIATE-RQ body: protocol version (2), reserved (2), called (16), calling (16).
_AE_TITLES_END = 36


def bind_log_context(info: AssociationInfo) -> None:
    """Every log event of this thread carries the association id from here on."""
    structlog.contextvars.bind_contextvars(association_id=info.association_id)
