"""The DICOM listener: C-ECHO and C-STORE, spool first, acknowledge after.

pynetdicom streams each received dataset, as it arrives, into a file under the
spool's ``tmp/``. The C-STORE handler reads the identifying attributes from that
file (never the pixel data), makes it durable and moves it into the spool as
received (no transcoding), commits the instance to the state store, and only then
returns a status. Anything slow happens elsewhere.
"""

from __future__ import annotations

import shutil
import time
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import structlog
from pydicom.uid import (
    JPEG2000,
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from infergate.config import IngestSettings
from infergate.dicom.admission import (
    AssociationRequest,
    ListenerLoad,
    Rejection,
    decide,
    space_shortfall,
)
from infergate.dicom.guards import PduLimits, check_inflated_size, guard_connection
from infergate.dicom.incoming import IncomingFiles
from infergate.dicom.received import read_header
from infergate.dicom.scu import set_nodelay
from infergate.dicom.spool import Spool
from infergate.dicom.status import Status, status_for
from infergate.errors import (
    InfergateError,
    InvalidInstanceError,
    SpoolFullError,
)
from infergate.logs import get_logger
from infergate.store import Arrival, AssociationAudit, InstanceRecord, Store

log = get_logger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
# Every storage SOP class pynetdicom knows, so a PACS routing a whole study (images,
# SR, presentation states, key objects) never sees a refused context.
ACCEPTED_STORAGE = tuple(
    cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax
)
# The transfer syntaxes scanners and PACS use; instances are stored as received.
# pynetdicom accepts, of the syntaxes a peer proposes, the first one in this list. A
# peer sending from files proposes the file's own syntax beside uncompressed ones, and
# often cannot decompress: so compressed syntaxes come first (lossless before lossy),
# which keeps every instance as it was sent.
ACCEPTED_TRANSFER_SYNTAXES = (
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
)

# Structlog's context (association id, peer) follows pynetdicom into its threads.
_config.PASS_CONTEXTVARS = True
# pynetdicom's standard handlers describe every PDU and DIMSE message (datasets
# included, at debug level) for a logger held at WARNING: ~7% of ingest's CPU for
# nothing, and patient data one level change away.
_config.LOG_HANDLER_LEVEL = "none"


@dataclass
class _AssociationStats:
    association_id: str
    started: float
    started_wall: float
    instances: int = 0
    bytes: int = 0
    failures: int = 0


@dataclass
class StorageSCP:
    """The listener; ``start()`` returns once it accepts connections."""

    settings: IngestSettings
    spool: Spool
    store: Store
    _ae: AE = field(init=False)
    _server: Any = field(init=False, default=None)
    _stats: weakref.WeakKeyDictionary[Association, _AssociationStats] = field(
        init=False, default_factory=weakref.WeakKeyDictionary
    )
    _incoming: IncomingFiles = field(init=False)

    def __post_init__(self) -> None:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_length
        ae.network_timeout = self.settings.network_timeout_s
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.network_timeout_s
        # Admission (peers, called AE titles, load) is decided in _on_requested, which
        # logs and audits every refusal. pynetdicom's own limit also counts bare TCP
        # connections, so it is set far above ours, as a backstop only.
        ae.require_called_aet = False
        ae.maximum_associations = 4 * self.settings.max_associations
        self._incoming = IncomingFiles(self.spool.tmp_dir)
        self._incoming.install()
        ae.add_supported_context(VERIFICATION)
        for sop_class in ACCEPTED_STORAGE:
            ae.add_supported_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
        self._ae = ae

    def start(self) -> None:
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_connect),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        self._server = self._ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers
        )
        log.info(
            "ingest.listener.started",
            ae_title=self.settings.ae_title,
            host=self.settings.host,
            port=self.settings.port,
        )

    def stop(self) -> None:
        """Stop listening, and give open associations the network timeout to finish
        (their last events write the audit trail)."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server = None
        deadline = time.monotonic() + self.settings.network_timeout_s
        while self._requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("ingest.listener.stopped", still_open=len(self._requested()))

    # -- association events ------------------------------------------------------

    def _on_connect(self, event: evt.Event) -> None:
        set_nodelay(event)
        wrapper = event.assoc.dul.socket
        address = event.assoc.requestor.address

        def refused(pdu_type: int, declared: int, limit: int) -> None:
            log.warning(
                "ingest.pdu.refused",
                peer_address=address,
                pdu_type=f"0x{pdu_type:02X}",
                declared_bytes=declared,
                limit_bytes=limit,
                reason="declared PDU length over the limit; connection closed",
            )

        if wrapper is not None:
            guard_connection(
                wrapper,
                self.settings.network_timeout_s,
                PduLimits(
                    association_request_bytes=self.settings.max_association_request_bytes,
                    pdata_bytes=self.settings.max_pdu_length,
                ),
                refused,
            )
        stats = _AssociationStats(
            association_id=uuid.uuid4().hex[:16], started=time.monotonic(), started_wall=time.time()
        )
        self._stats[event.assoc] = stats
        structlog.contextvars.bind_contextvars(association_id=stats.association_id)

    def _peer(self, event: evt.Event) -> dict[str, Any]:
        requestor = event.assoc.requestor
        return {
            "peer_address": requestor.address,
            "peer_port": requestor.port,
            "calling_ae": _ae_text(requestor.ae_title),
            "called_ae": _ae_text(event.assoc.acceptor.ae_title),
        }

    def open_associations(self) -> int:
        """Connections this listener is serving now (their threads still running)."""
        return sum(1 for a in self._ae.active_associations if a.is_acceptor)

    def _requested(self) -> list[Association]:
        """Connections that sent an A-ASSOCIATE-RQ: what the limits count and stop() waits
        for. A bare TCP connection (a health check, a port scan) is neither."""
        return [
            a
            for a in self._ae.active_associations
            if a.is_acceptor and a.requestor.primitive is not None
        ]

    @property
    def called_ae_titles(self) -> frozenset[str]:
        return frozenset({self.settings.ae_title})

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        if primitive is None:  # EVT_REQUESTED fires only once the request arrived
            return
        request = AssociationRequest(
            calling_ae=_ae_text(primitive.calling_ae_title),
            called_ae=_ae_text(primitive.called_ae_title),
            address=assoc.requestor.address,
        )
        others = [a for a in self._requested() if a is not assoc]
        load = ListenerLoad(
            associations=len(others),
            associations_from_address=sum(
                1 for a in others if a.requestor.address == request.address
            ),
            free_bytes=shutil.disk_usage(self.spool.root).free,
        )
        rejection = decide(request, self.settings, self.called_ae_titles, load)
        if rejection is not None:
            self._reject(event, request, rejection)

    def _reject(self, event: evt.Event, request: AssociationRequest, rejection: Rejection) -> None:
        assoc = event.assoc
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        assoc.is_rejected = True
        stats = self._stats.get(assoc)
        self._audit(event, request.calling_ae, request.called_ae, "rejected", rejection.reason)
        log.warning(
            "ingest.association.rejected",
            peer_address=request.address,
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            reason=rejection.reason,
            result=rejection.result,
            source=rejection.source,
            diagnostic=rejection.diagnostic,
            association_id=stats.association_id if stats else None,
        )
        assoc.kill()

    def _audit(
        self, event: evt.Event, calling: str, called: str, outcome: str, reason: str | None
    ) -> None:
        stats = self._stats.get(event.assoc)
        if stats is None:
            return
        requestor = event.assoc.requestor
        try:
            self.store.audit_association(
                AssociationAudit(
                    association_id=stats.association_id,
                    peer_address=requestor.address,
                    peer_port=requestor.port,
                    calling_ae=calling,
                    called_ae=called,
                    tls=False,
                    outcome=outcome,
                    reason=reason,
                    started_at=stats.started_wall,
                    ended_at=time.time() if outcome == "rejected" else None,
                )
            )
        except InfergateError as exc:  # the audit must not take the listener down
            log.error("ingest.audit.failed", reason=str(exc))

    def _on_accepted(self, event: evt.Event) -> None:
        peer = self._peer(event)
        self._audit(event, peer["calling_ae"], peer["called_ae"], "accepted", None)
        log.info("ingest.association.accepted", **peer)

    def _on_rejected(self, event: evt.Event) -> None:
        # Only pynetdicom's own rejections arrive here (its association limit).
        peer = self._peer(event)
        self._audit(event, peer["calling_ae"], peer["called_ae"], "rejected", "pynetdicom limit")
        log.warning("ingest.association.rejected", reason="pynetdicom limit", **peer)

    def _on_closed(self, event: evt.Event) -> None:
        cut_off = self._incoming.forget(event.assoc)
        if cut_off:
            log.warning("ingest.instance.incomplete", files_removed=cut_off)
        stats = self._stats.get(event.assoc)
        if stats is None or event.assoc.is_rejected:
            return
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        try:
            self.store.close_association(
                stats.association_id,
                outcome,
                instances=stats.instances,
                size=stats.bytes,
                failures=stats.failures,
                now=time.time(),
            )
        except InfergateError as exc:
            log.error("ingest.audit.failed", reason=str(exc))
        log.info(
            f"ingest.association.{outcome}",
            association_id=stats.association_id,
            instances=stats.instances,
            bytes=stats.bytes,
            failures=stats.failures,
            duration_s=round(time.monotonic() - stats.started, 3),
        )

    # -- DIMSE services -----------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        log.info("ingest.echo", **self._peer(event))
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        stats = self._stats.get(event.assoc)
        association_id = stats.association_id if stats else "unknown"
        try:
            record = self._accept_instance(event, association_id)
        except InfergateError as exc:
            status = status_for(exc)
            if stats:
                stats.failures += 1
            log.warning(
                "ingest.instance.refused",
                reason=str(exc),
                error=type(exc).__name__,
                status=f"0x{int(status):04X}",
            )
            return int(status)
        if stats:
            stats.instances += 1
            stats.bytes += record.size
        return int(Status.SUCCESS)

    def _accept_instance(self, event: evt.Event, association_id: str) -> InstanceRecord:
        try:
            received = event.dataset_path
        except AttributeError as exc:
            raise InvalidInstanceError("the C-STORE request carries no dataset") from exc
        deflated = event.context.transfer_syntax == DeflatedExplicitVRLittleEndian
        if deflated:
            check_inflated_size(received, self.settings.max_inflated_bytes)
        request = event.request
        if not isinstance(request, C_STORE):
            raise InvalidInstanceError("not a C-STORE request")
        header = read_header(
            received, str(request.AffectedSOPInstanceUID or ""), event.context.transfer_syntax
        )
        shortfall = space_shortfall(shutil.disk_usage(self.spool.root).free, self.settings)
        if shortfall is not None:
            raise SpoolFullError(shortfall)
        digest = self._incoming.sha256(received)
        path = self.spool.adopt(received)
        requestor = event.assoc.requestor
        record = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series_uid=header.series_uid,
            study_uid=header.study_uid,
            modality=header.modality,
            path=path,
            size=path.stat().st_size,
            association_id=association_id,
            calling_ae=_ae_text(requestor.ae_title),
            called_ae=_ae_text(event.assoc.acceptor.ae_title),
            sha256=digest,
        )
        outcome = self.store.record_instance(
            record, replace_changed=self.settings.changed_instance_policy == "replace"
        )
        ids = {"series_uid": record.series_uid, "sop_instance_uid": record.sop_instance_uid}
        if outcome.arrival is Arrival.NEW:
            log.debug("ingest.instance.stored", bytes=record.size, **ids)
        elif outcome.arrival is Arrival.DUPLICATE:
            self.spool.discard(path)
            log.info("ingest.instance.duplicate", **ids)
        else:
            kept = outcome.arrival is Arrival.CHANGED_KEPT
            self.spool.discard(path if kept else outcome.superseded_path or path)
            log.warning(
                "ingest.instance.changed",
                policy=self.settings.changed_instance_policy,
                kept="first" if kept else "new",
                **ids,
            )
        return record


def _ae_text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip()
    return value.strip()
