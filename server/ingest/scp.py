"""The DICOM listener: C-ECHO and C-STORE, spool first, acknowledge after.

Each accepted connection runs in a thread of its own (``association``), which
streams each received dataset, as it arrives, into a file under the spool's
``tmp/``. The C-STORE service reads the identifying attributes from that file
(never the pixel data), makes it durable and moves it into the spool as received
(no transcoding), commits the instance to the state store (``commits``: together
with whatever other associations received meanwhile), and only then returns a
status. Anything slow happens elsewhere.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field

from pydicom._uid_dict import UID_dictionary  # the standard's UID table (Part 6)
from pydicom.uid import (
    JPEG2000,
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
from pynetdicom import AllStoragePresentationContexts
from pynetdicom.presentation import PresentationContext, build_context

from infergate.config import IngestSettings
from infergate.dicom.status import Status, status_for
from infergate.dicom.tls import server_context
from infergate.errors import (
    InfergateError,
    SpoolFullError,
)
from infergate.ingest.admission import Rejection, space_shortfall
from infergate.ingest.association import (
    VERIFICATION,
    AssociationInfo,
    InboundAssociation,
    ReceivedInstance,
    bind_log_context,
    peer_fields,
)
from infergate.ingest.association_events import AssociationEvents
from infergate.ingest.commits import InstanceCommitter
from infergate.ingest.guards import check_inflated_size
from infergate.ingest.metrics import BYTES_RECEIVED, INSTANCES_RECEIVED, INSTANCES_REFUSED
from infergate.ingest.received import read_header
from infergate.ingest.sockets import ListeningSockets, accept_connections
from infergate.ingest.spool import Spool
from infergate.ingest.upper_layer import Connection, PduLimits
from infergate.logs import get_logger
from infergate.store import Arrival, InstanceRecord, Store

log = get_logger(__name__)


def _requested(info: AssociationInfo | None) -> bool:
    return info is not None and info.requested


# Every storage SOP class pynetdicom knows, so a PACS routing a whole study (images,
# SR, presentation states, key objects) never sees a refused context.
# Retired storage SOP classes that older modalities still send (the retired Ultrasound
# Image Storage, Nuclear Medicine Image Storage, ...) are accepted too, from pydicom's
# dictionary, and stored as received.
ACCEPTED_STORAGE = tuple(
    cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax
) + tuple(
    uid
    for uid, (name, kind, _, retired, _) in UID_dictionary.items()
    if kind == "SOP Class"
    and retired == "Retired"
    and uid.startswith("1.2.840.10008.5.1.4.")
    and "Storage" in name
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
# Connections beyond this many times max_associations are closed as they arrive
# (admission refuses associations well before; this bounds bare TCP connections).
_CONNECTIONS_PER_ASSOCIATION = 4


@dataclass
class StorageSCP:
    """The listener of one process; ``start()`` returns once it accepts connections."""

    settings: IngestSettings
    spool: Spool
    store: Store
    # The gateway node (node.name) its associations are audited and counted under.
    node: str = ""
    _events: AssociationEvents = field(init=False)
    _committer: InstanceCommitter = field(init=False)
    _contexts: list[PresentationContext] = field(init=False)
    _stopping: threading.Event = field(init=False, default_factory=threading.Event)
    _acceptors: list[threading.Thread] = field(init=False, default_factory=list)
    _sockets: list[socket.socket] = field(init=False, default_factory=list)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)
    _open: dict[int, AssociationInfo | None] = field(init=False, default_factory=dict)
    # The peer address of each open connection (by thread), to cap those that have
    # not yet sent an A-ASSOCIATE-RQ.
    _addresses: dict[int, str] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._events = AssociationEvents(self.settings, self.store, self.spool.root, self.node)
        self._committer = InstanceCommitter(
            self.spool, self.store, self.settings.changed_instance_policy == "replace"
        )
        self._contexts = [build_context(VERIFICATION)] + [
            build_context(sop_class, list(ACCEPTED_TRANSFER_SYNTAXES))
            for sop_class in ACCEPTED_STORAGE
        ]

    def start(self, sockets: ListeningSockets | None = None) -> None:
        """Serve on ``sockets`` (shared with other listener processes), or on sockets
        of its own bound to the configured ports."""
        sockets = sockets or ListeningSockets.open(self.settings)
        tls = server_context(self.settings.tls) if self.settings.tls is not None else None
        for sock, context in ((sockets.plain, None), (sockets.tls, tls)):
            if sock is not None:
                self._serve(sock, context)

    def _serve(self, sock: socket.socket, tls: ssl.SSLContext | None) -> None:
        def on_connection(connection: socket.socket, address: tuple[str, int]) -> None:
            self._admit_connection(connection, address, tls)

        thread = threading.Thread(
            target=accept_connections,
            args=(sock, self._stopping, on_connection),
            name="ingest-accept",
            daemon=True,
        )
        thread.start()
        self._acceptors.append(thread)
        self._sockets.append(sock)
        log.info(
            "ingest.listener.started",
            ae_title=self.settings.ae_title,
            host=self.settings.host,
            port=sock.getsockname()[1],
            tls=tls is not None,
        )

    def _admit_connection(
        self, connection: socket.socket, address: tuple[str, int], tls: ssl.SSLContext | None
    ) -> None:
        with self._lock:
            crowded = (
                len(self._open) >= _CONNECTIONS_PER_ASSOCIATION * self.settings.max_associations
            )
            waiting = sum(
                1
                for key, where in self._addresses.items()
                if where == address[0] and not _requested(self._open.get(key))
            )
        reason = None
        if crowded:
            reason = "too many open connections"
        elif waiting >= self.settings.max_unassociated_per_address:
            # Sockets that never associate (no AE title, no peer entry needed) must not
            # lock legitimate peers out: the per-address limit holds before the request.
            reason = (
                f"{waiting} connections from this address have not yet sent an association"
                " request (ingest.max_unassociated_per_address)"
            )
        if reason is not None:
            log.warning("ingest.connection.refused", peer_address=address[0], reason=reason)
            connection.close()
            return
        thread = threading.Thread(
            target=self._run_connection, args=(connection, address, tls), daemon=True
        )
        with self._lock:
            thread.start()
            self._open[thread.ident or 0] = None
            self._addresses[thread.ident or 0] = address[0]

    def _run_connection(
        self, connection: socket.socket, address: tuple[str, int], tls: ssl.SSLContext | None
    ) -> None:
        key = threading.get_ident()
        try:
            prepared = self._events.connected(connection, address, tls)
            if prepared is None:
                return
            sock, info = prepared
            bind_log_context(info)
            with self._lock:
                self._open[key] = info
            limits = PduLimits(
                association_request_bytes=self.settings.max_association_request_bytes,
                pdata_bytes=self.settings.max_pdu_length,
            )
            InboundAssociation(
                Connection(sock, limits, self.settings.network_timeout_s),
                info,
                services=self,
                contexts=self._contexts,
                acse_timeout_s=self.settings.acse_timeout_s,
                tmp_dir=self.spool.tmp_dir,
            ).run()
        except Exception as exc:  # one connection's failure must not take the listener down
            log.exception(
                "ingest.connection.error", peer_address=address[0], error=type(exc).__name__
            )
            connection.close()
        finally:
            with self._lock:
                self._open.pop(key, None)
                self._addresses.pop(key, None)

    def stop(self) -> None:
        """Stop accepting, and give open associations the network timeout to finish
        (their ends write the audit trail)."""
        if not self._acceptors:
            return
        self._stopping.set()
        for thread in self._acceptors:
            thread.join()
        for sock in self._sockets:
            sock.close()  # this process's descriptor only
        self._acceptors, self._sockets = [], []
        deadline = time.monotonic() + self.settings.network_timeout_s
        while self._requested() and time.monotonic() < deadline:
            time.sleep(0.05)
        log.info("ingest.listener.stopped", still_open=self._requested())

    def open_associations(self) -> int:
        """Connections this listener is serving now (their threads still running)."""
        with self._lock:
            return len(self._open)

    def _requested(self) -> int:
        """Connections that sent an A-ASSOCIATE-RQ: what stop() waits for. A bare TCP
        connection (a health check, a port scan) is not one."""
        with self._lock:
            return sum(1 for info in self._open.values() if info is not None and info.requested)

    # -- services (association.Services) -----------------------------------------

    def admit(self, info: AssociationInfo, refused: Rejection | None) -> Rejection | None:
        return self._events.admit(info, refused)

    def closed(self, info: AssociationInfo, outcome: str, reason: str | None) -> None:
        self._events.closed(info, outcome, reason)

    def echo(self, info: AssociationInfo) -> int:
        log.info("ingest.echo", **peer_fields(info))
        return int(Status.SUCCESS)

    def store_instance(
        self, info: AssociationInfo, instance: ReceivedInstance
    ) -> tuple[int, str | None]:
        try:
            record = self._accept_instance(info, instance)
        except InfergateError as exc:
            status = status_for(exc)
            info.failures += 1
            log.warning(
                "ingest.instance.refused",
                reason=str(exc),
                error=type(exc).__name__,
                status=f"0x{int(status):04X}",
            )
            INSTANCES_REFUSED.labels(f"0x{int(status):04X}").inc()
            return int(status), str(exc)
        info.instances += 1
        info.bytes += record.size
        INSTANCES_RECEIVED.inc()
        BYTES_RECEIVED.inc(record.size)
        return int(Status.SUCCESS), None

    def _accept_instance(self, info: AssociationInfo, instance: ReceivedInstance) -> InstanceRecord:
        received = instance.path
        if instance.transfer_syntax == DeflatedExplicitVRLittleEndian:
            check_inflated_size(received, self.settings.max_inflated_bytes)
        header = read_header(received, instance.sop_instance_uid, instance.transfer_syntax)
        shortfall = space_shortfall(shutil.disk_usage(self.spool.root).free, self.settings)
        if shortfall is not None:
            raise SpoolFullError(shortfall)
        received_record = InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            sop_class_uid=header.sop_class_uid,
            series_uid=header.series_uid,
            study_uid=header.study_uid,
            modality=header.modality,
            path=received,
            size=instance.size,
            association_id=info.association_id,
            calling_ae=info.calling_ae,
            called_ae=info.called_ae,
            sha256=instance.sha256,
        )
        record, outcome = self._committer.commit(received, received_record)
        path = record.path
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
