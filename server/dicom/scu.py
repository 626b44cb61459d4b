"""C-STORE SCU: delivering result files to a destination, all in one association."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
from pydicom.uid import (
    Comprehensive3DSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SegmentationStorage,
)
from pynetdicom import AE, evt

from infergate.config import Destination
from infergate.errors import ExportError

RESULT_SOP_CLASSES = (SegmentationStorage, Comprehensive3DSRStorage)
# Statuses a receiver may answer that still mean "stored" (PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: Nagle's algorithm costs ~45 ms per message (PERFORMANCE.md)."""
    wrapper = event.assoc.dul.socket
    if wrapper is not None and wrapper.socket is not None:
        wrapper.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send_files(
    paths: list[Path], destination: Destination, calling_ae: str, timeout_s: float
) -> None:
    """C-STORE ``paths`` to ``destination`` in one association.

    Raises :class:`ExportError` naming the destination and the status or failure.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    for sop_class in RESULT_SOP_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    where = f"{destination.ae_title} at {destination.host}:{destination.port}"
    assoc = ae.associate(
        destination.host,
        destination.port,
        ae_title=destination.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
    )
    if not assoc.is_established:
        raise ExportError(f"destination {where} refused or did not answer the association")
    try:
        for path in paths:
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise ExportError(f"destination {where} gave no C-STORE response for {path.name}")
            if code not in _STORED:
                raise ExportError(f"destination {where} answered 0x{code:04X} to {path.name}")
    finally:
        if assoc.is_established:
            assoc.release()
