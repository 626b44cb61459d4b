"""An association's life on the listener, from connection to close.

On connection: TCP_NODELAY, the TLS handshake on the TLS port (``tls``), the read
timeout and PDU caps (``guards``). On request:
admission (``admission.decide``), counted against the associations open in every
listener process and recorded in the same transaction (``Store.admit``). On
acceptance, rejection, release and abort: the audit row and a log event. Nothing
here touches a dataset; the DIMSE services are in ``scp``.
"""

from __future__ import annotations

import os
import shutil
import ssl
import time
import uuid
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from pynetdicom import evt
from pynetdicom.association import Association

from infergate.config import IngestSettings
from infergate.dicom.admission import (
    SERVICE_PROVIDER_PRESENTATION,
    TEMPORARY_CONGESTION,
    TRANSIENT,
    AssociationRequest,
    ListenerLoad,
    Rejection,
    decide,
)
from infergate.dicom.guards import PduLimits, guard_connection
from infergate.dicom.incoming import IncomingFiles
from infergate.dicom.scu import set_nodelay
from infergate.dicom.tls import client_subject, handshake
from infergate.errors import InfergateError, TlsRefusedError
from infergate.logs import get_logger
from infergate.store import AssociationAudit, Store

log = get_logger(__name__)


@dataclass
class AssociationStats:
    association_id: str
    started: float
    started_wall: float
    tls: bool = False
    tls_subject: str | None = None
    instances: int = 0
    bytes: int = 0
    failures: int = 0


def ae_text(value: str | bytes) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").strip()
    return value.strip()


def called_ae_of(assoc: Association) -> str:
    """The AE title the peer called, from its request (pynetdicom's acceptor.ae_title is
    the listener's own, the same whichever of its called AE titles the peer used)."""
    primitive = assoc.requestor.primitive
    if primitive is None:
        return ae_text(assoc.acceptor.ae_title)
    return ae_text(primitive.called_ae_title)


def peer_of(event: evt.Event) -> dict[str, Any]:
    """The peer's address and AE titles, as every association event logs them."""
    requestor = event.assoc.requestor
    return {
        "peer_address": requestor.address,
        "peer_port": requestor.port,
        "calling_ae": ae_text(requestor.ae_title),
        "called_ae": called_ae_of(event.assoc),
    }


@dataclass
class AssociationEvents:
    """The association event handlers of one listener process."""

    settings: IngestSettings
    store: Store
    spool_root: Path
    incoming: IncomingFiles
    process_id: int = field(default_factory=os.getpid)
    _stats: weakref.WeakKeyDictionary[Association, AssociationStats] = field(
        init=False, default_factory=weakref.WeakKeyDictionary
    )

    def handlers(self, tls: ssl.SSLContext | None) -> list[Any]:
        """The bindings for one server; with ``tls``, every connection it accepts must
        complete a TLS handshake first."""
        return [
            (evt.EVT_CONN_OPEN, self.on_connect, [tls]),
            (evt.EVT_REQUESTED, self.on_requested),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_closed),
            (evt.EVT_ABORTED, self.on_closed),
        ]

    def stats(self, assoc: Association) -> AssociationStats | None:
        return self._stats.get(assoc)

    def on_connect(self, event: evt.Event, tls: ssl.SSLContext | None) -> None:
        set_nodelay(event)
        wrapper = event.assoc.dul.socket
        address = event.assoc.requestor.address
        stats = AssociationStats(
            association_id=uuid.uuid4().hex[:16],
            started=time.monotonic(),
            started_wall=time.time(),
            tls=tls is not None,
        )
        structlog.contextvars.bind_contextvars(association_id=stats.association_id)
        tls_settings = self.settings.tls  # set whenever this server has a TLS context
        if tls is not None and tls_settings is not None and wrapper and wrapper.socket is not None:
            try:
                secured = handshake(wrapper.socket, tls, tls_settings.handshake_timeout_s)
            except TlsRefusedError as exc:
                self._refuse_tls(event, stats, exc)
                wrapper.close()  # queues "connection closed": the association ends at once
                return
            wrapper.socket = secured
            stats.tls_subject = client_subject(secured)

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
        self._stats[event.assoc] = stats

    def _refuse_tls(self, event: evt.Event, stats: AssociationStats, exc: TlsRefusedError) -> None:
        requestor = event.assoc.requestor
        if exc.peer_closed:  # connected and left without a word: a health check
            log.info("ingest.tls.closed", peer_address=requestor.address, reason=str(exc))
            return
        log.warning(
            "ingest.tls.refused",
            peer_address=requestor.address,
            peer_port=requestor.port,
            reason=str(exc),
        )
        refusal = AssociationAudit(
            association_id=stats.association_id,
            peer_address=requestor.address,
            peer_port=requestor.port,
            calling_ae="",
            called_ae="",
            tls=True,
            outcome="rejected",
            reason=str(exc),
            started_at=stats.started_wall,
            ended_at=time.time(),
            process_id=self.process_id,
        )
        try:
            self.store.admit(refusal, lambda _total, _same: None, time.time())
        except InfergateError as error:
            log.error("ingest.audit.failed", reason=str(error))

    def on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        primitive = assoc.requestor.primitive
        stats = self._stats.get(assoc)
        if primitive is None or stats is None:  # fires once the request arrived
            return
        request = AssociationRequest(
            calling_ae=ae_text(primitive.calling_ae_title),
            called_ae=ae_text(primitive.called_ae_title),
            address=assoc.requestor.address,
            tls=stats.tls,
        )
        free_bytes = shutil.disk_usage(self.spool_root).free

        def judge(open_associations: int, open_from_address: int) -> Rejection | None:
            load = ListenerLoad(open_associations, open_from_address, free_bytes)
            return decide(request, self.settings, load)

        audit = AssociationAudit(
            association_id=stats.association_id,
            peer_address=request.address,
            peer_port=assoc.requestor.port,
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            tls=request.tls,
            outcome="accepted",
            reason=None,
            started_at=stats.started_wall,
            process_id=self.process_id,
        )
        try:
            rejection = self.store.admit(audit, judge, time.time())
        except InfergateError as exc:  # without the store nothing could be stored anyway
            log.error("ingest.audit.failed", reason=str(exc))
            rejection = Rejection(
                TRANSIENT,
                SERVICE_PROVIDER_PRESENTATION,
                TEMPORARY_CONGESTION,
                "the state store is not available",
            )
        if rejection is not None:
            self._reject(event, request, rejection, stats)

    def _reject(
        self,
        event: evt.Event,
        request: AssociationRequest,
        rejection: Rejection,
        stats: AssociationStats,
    ) -> None:
        assoc = event.assoc
        assoc.acse.send_reject(rejection.result, rejection.source, rejection.diagnostic)
        assoc.is_rejected = True
        log.warning(
            "ingest.association.rejected",
            peer_address=request.address,
            calling_ae=request.calling_ae,
            called_ae=request.called_ae,
            reason=rejection.reason,
            result=rejection.result,
            source=rejection.source,
            diagnostic=rejection.diagnostic,
            association_id=stats.association_id,
        )
        assoc.kill()

    def on_accepted(self, event: evt.Event) -> None:
        stats = self._stats.get(event.assoc)
        tls = {"tls": True, "tls_subject": stats.tls_subject} if stats and stats.tls else {}
        log.info("ingest.association.accepted", **peer_of(event), **tls)

    def on_rejected(self, event: evt.Event) -> None:
        # Only pynetdicom's own rejections arrive here (its association limit, its
        # protocol checks), after admission recorded the association as accepted.
        stats = self._stats.get(event.assoc)
        reason = "refused by pynetdicom after admission (its association limit)"
        if stats is not None:
            self._close(stats, "rejected", reason)
        log.warning("ingest.association.rejected", reason=reason, **peer_of(event))

    def on_closed(self, event: evt.Event) -> None:
        cut_off = self.incoming.forget(event.assoc)
        if cut_off:
            log.warning("ingest.instance.incomplete", files_removed=cut_off)
        stats = self._stats.get(event.assoc)
        if stats is None or event.assoc.is_rejected:
            return
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        self._close(stats, outcome, None)
        log.info(
            f"ingest.association.{outcome}",
            association_id=stats.association_id,
            instances=stats.instances,
            bytes=stats.bytes,
            failures=stats.failures,
            duration_s=round(time.monotonic() - stats.started, 3),
        )

    def _close(self, stats: AssociationStats, outcome: str, reason: str | None) -> None:
        try:
            self.store.close_association(
                stats.association_id,
                outcome,
                instances=stats.instances,
                size=stats.bytes,
                failures=stats.failures,
                now=time.time(),
                reason=reason,
            )
        except InfergateError as exc:  # the audit must not take the listener down
            log.error("ingest.audit.failed", reason=str(exc))
