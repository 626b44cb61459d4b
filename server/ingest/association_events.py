"""An association's life on the listener, from connection to close.

On connection: TCP_NODELAY and, on the TLS port, the TLS handshake, in the
connection's own thread (one silent client holds up no one). On request: admission
(``admission.decide``), counted against the associations open in every listener
process and recorded in the same transaction (``Store.admit``). On its end: the
audit row and a log event. Nothing here touches a dataset; the DIMSE services are in
``scp``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from infergate.config import IngestSettings
from infergate.dicom.tls import client_subject, handshake
from infergate.errors import InfergateError, TlsRefusedError
from infergate.ingest.admission import (
    SERVICE_PROVIDER_PRESENTATION,
    TEMPORARY_CONGESTION,
    TRANSIENT,
    AssociationRequest,
    ListenerLoad,
    Rejection,
    decide,
)
from infergate.ingest.association import AssociationInfo
from infergate.ingest.metrics import ASSOCIATIONS, rejection_reason
from infergate.logs import get_logger
from infergate.store import AssociationAudit, Store

log = get_logger(__name__)


@dataclass
class AssociationEvents:
    """Admission and audit of the associations of one listener process."""

    settings: IngestSettings
    store: Store
    spool_root: Path
    node: str = ""
    process_id: int = field(default_factory=os.getpid)

    def connected(
        self, sock: socket.socket, address: tuple[str, int], tls: ssl.SSLContext | None
    ) -> tuple[socket.socket, AssociationInfo] | None:
        """Prepare an accepted connection: the socket to speak DICOM on and the record of
        the association, or None when the TLS handshake failed (refusal logged and
        audited, connection closed)."""
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        info = AssociationInfo(peer_address=address[0], peer_port=address[1], tls=tls is not None)
        tls_settings = self.settings.tls  # set whenever this server has a TLS context
        if tls is None or tls_settings is None:
            return sock, info
        try:
            secured = handshake(sock, tls, tls_settings.handshake_timeout_s)
        except TlsRefusedError as exc:
            sock.close()
            self._refuse_tls(info, exc)
            return None
        info.tls_subject = client_subject(secured)
        return secured, info

    def _refuse_tls(self, info: AssociationInfo, exc: TlsRefusedError) -> None:
        if exc.peer_closed:  # connected and left without a word: a health check
            log.info("ingest.tls.closed", peer_address=info.peer_address, reason=str(exc))
            return
        log.warning(
            "ingest.tls.refused",
            peer_address=info.peer_address,
            peer_port=info.peer_port,
            reason=str(exc),
        )
        self._record(info, "rejected", str(exc))

    def admit(self, info: AssociationInfo, refused: Rejection | None) -> Rejection | None:
        """Decide whether the requested association may go on, and audit the decision."""
        request = AssociationRequest(
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            address=info.peer_address,
            tls=info.tls,
        )
        free_bytes = shutil.disk_usage(self.spool_root).free

        def judge(open_associations: int, open_from_address: int) -> Rejection | None:
            if refused is not None:
                return refused
            load = ListenerLoad(open_associations, open_from_address, free_bytes)
            return decide(request, self.settings, load)

        try:
            rejection = self.store.admit(self._audit(info, "accepted", None), judge, time.time())
        except InfergateError as exc:  # without the store nothing could be stored anyway
            log.error("ingest.audit.failed", reason=str(exc))
            rejection = Rejection(
                TRANSIENT,
                SERVICE_PROVIDER_PRESENTATION,
                TEMPORARY_CONGESTION,
                "the state store is not available",
            )
        if rejection is None:
            ASSOCIATIONS.labels("accepted", "").inc()
        else:
            reason = rejection_reason(rejection.source, rejection.diagnostic)
            ASSOCIATIONS.labels("rejected", reason).inc()
            log.warning(
                "ingest.association.rejected",
                peer_address=request.address,
                calling_ae=request.calling_ae,
                called_ae=request.called_ae,
                reason=rejection.reason,
                result=rejection.result,
                source=rejection.source,
                diagnostic=rejection.diagnostic,
                association_id=info.association_id,
            )
        return rejection

    def closed(self, info: AssociationInfo, outcome: str, reason: str | None) -> None:
        if outcome == "rejected":  # audited and counted as such when admission decided
            return
        ASSOCIATIONS.labels(outcome, "").inc()
        try:
            self.store.close_association(
                info.association_id,
                outcome,
                instances=info.instances,
                size=info.bytes,
                failures=info.failures,
                now=time.time(),
                reason=reason,
            )
        except InfergateError as exc:  # the audit must not take the listener down
            log.error("ingest.audit.failed", reason=str(exc))
        log.info(
            f"ingest.association.{outcome}",
            association_id=info.association_id,
            instances=info.instances,
            bytes=info.bytes,
            failures=info.failures,
            duration_s=round(time.monotonic() - info.started, 3),
            **({"reason": reason} if reason else {}),
        )

    def _audit(self, info: AssociationInfo, outcome: str, reason: str | None) -> AssociationAudit:
        return AssociationAudit(
            association_id=info.association_id,
            peer_address=info.peer_address,
            peer_port=info.peer_port,
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            tls=info.tls,
            outcome=outcome,
            reason=reason,
            started_at=info.started_wall,
            process_id=self.process_id,
            node=self.node,
        )

    def _record(self, info: AssociationInfo, outcome: str, reason: str) -> None:
        """An association that ended before it was requested (a refused handshake)."""
        ASSOCIATIONS.labels(outcome, "TLS handshake").inc()
        audit = self._audit(info, outcome, reason)
        try:
            self.store.record_association(audit, ended_at=time.time())
        except InfergateError as error:
            log.error("ingest.audit.failed", reason=str(error))
