"""The DICOM listener: C-ECHO and C-STORE, spool first, acknowledge after.

pynetdicom streams each received dataset, as it arrives, into a file under the
spool's ``tmp/``. The C-STORE handler reads the identifying attributes from that
file (never the pixel data), makes it durable and moves it into the spool as
received (no transcoding), commits the instance to the state store, and only then
returns a status. Anything slow happens elsewhere.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

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
from infergate.dicom.admission import space_shortfall
from infergate.dicom.association_events import (
    AssociationEvents,
    ae_text,
    called_ae_of,
    peer_of,
)
from infergate.dicom.guards import check_inflated_size
from infergate.dicom.incoming import IncomingFiles
from infergate.dicom.received import read_header
from infergate.dicom.sockets import AdoptingServer, ListeningSockets
from infergate.dicom.spool import Spool
from infergate.dicom.status import Status, status_for
from infergate.dicom.tls import server_context
from infergate.errors import (
    InfergateError,
    InvalidInstanceError,
    SpoolFullError,
)
from infergate.logs import get_logger
from infergate.store import Arrival, InstanceRecord, Store

log = get_logger(__name__)

VERIFICATION = UID("1.2.840.10008.1.1")
# Every storage SOP class pynetdicom knows, so a PACS routing a whole study (images,
# SR, presentation states, key objects) never sees a refused context.
ACCEPTED_STORAGE = tuple(
    cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax
)
# The transfer syntaxes scanners and PACS use; instances are stored as received.
# pynetdicom accepts, of the syntaxes a peer proposes in one presentation context, the
# first one in this list. A peer sending from files proposes the file's own syntax
# beside uncompressed ones, and often cannot decompress: so lossless compressed
# syntaxes come first, which keeps such instances as they were sent. Lossy ones come
# after the uncompressed ones: a peer that offers both would otherwise be asked to
# compress lossily, changing pixel values before any model sees them; one that holds
# lossy data and offers only that syntax still gets it.
ACCEPTED_TRANSFER_SYNTAXES = (
    JPEGLSLossless,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLossless,
    RLELossless,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLSNearLossless,
    JPEG2000,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
)

# Structlog's context (association id, peer) follows pynetdicom into its threads.
_config.PASS_CONTEXTVARS = True
# pynetdicom's standard handlers describe every PDU and DIMSE message (datasets
# included, at debug level) for a logger held at WARNING: ~7% of ingest's CPU for
# nothing, and patient data one level change away.
_config.LOG_HANDLER_LEVEL = "none"


@dataclass
class StorageSCP:
    """The listener of one process; ``start()`` returns once it accepts connections."""

    settings: IngestSettings
    spool: Spool
    store: Store
    _ae: AE = field(init=False)
    _servers: list[AdoptingServer] = field(init=False, default_factory=list)
    _incoming: IncomingFiles = field(init=False)
    _events: AssociationEvents = field(init=False)

    def __post_init__(self) -> None:
        ae = AE(ae_title=self.settings.ae_title)
        ae.maximum_pdu_size = self.settings.max_pdu_length
        ae.network_timeout = self.settings.network_timeout_s
        ae.acse_timeout = self.settings.acse_timeout_s
        ae.dimse_timeout = self.settings.network_timeout_s
        # Admission (peers, called AE titles, load) is decided on EVT_REQUESTED, which
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
        self._events = AssociationEvents(self.settings, self.store, self.spool.root, self._incoming)

    def start(self, sockets: ListeningSockets | None = None) -> None:
        """Serve on ``sockets`` (shared with other listener processes), or on sockets
        of its own bound to the configured ports."""
        sockets = sockets or ListeningSockets.open(self.settings)
        tls = server_context(self.settings.tls) if self.settings.tls is not None else None
        for sock, context in ((sockets.plain, None), (sockets.tls, tls)):
            if sock is not None:
                self._serve(sock, context)

    def _serve(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        handlers: list[Any] = [
            *self._events.handlers(tls),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
        ]
        server = cast(  # make_server builds an instance of server_class
            AdoptingServer,
            self._ae.make_server(
                sock.getsockname()[:2],
                evt_handlers=handlers,
                server_class=AdoptingServer,
                listening_socket=sock,
            ),
        )
        threading.Thread(target=server.serve_forever, name="ingest-accept", daemon=True).start()
        self._servers.append(server)
        log.info(
            "ingest.listener.started",
            ae_title=self.settings.ae_title,
            host=self.settings.host,
            port=sock.getsockname()[1],
            tls=tls is not None,
        )

    def stop(self) -> None:
        """Stop accepting, and give open associations the network timeout to finish
        (their last events write the audit trail)."""
        if not self._servers:
            return
        for server in self._servers:
            server.shutdown()
        self._servers = []
        deadline = time.monotonic() + self.settings.network_timeout_s
        while self._requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("ingest.listener.stopped", still_open=len(self._requested()))

    def open_associations(self) -> int:
        """Connections this listener is serving now (their threads still running)."""
        return sum(1 for a in self._ae.active_associations if a.is_acceptor)

    def _requested(self) -> list[Association]:
        """Connections that sent an A-ASSOCIATE-RQ: what stop() waits for. A bare TCP
        connection (a health check, a port scan) is not one."""
        return [
            a
            for a in self._ae.active_associations
            if a.is_acceptor and a.requestor.primitive is not None
        ]

    # -- DIMSE services -----------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        log.info("ingest.echo", **peer_of(event))
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> int:
        stats = self._events.stats(event.assoc)
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
            calling_ae=ae_text(requestor.ae_title),
            called_ae=called_ae_of(event.assoc),
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
