"""C-STORE SCU: delivering files (results, forwarded series) to a destination, all in one
association."""

from __future__ import annotations

import socket
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from infergate.config import Destination
from infergate.errors import ExportError

# Uncompressed data sets can be re-encoded in whichever of these the receiver accepts.
_UNCOMPRESSED = [str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
# C-STORE Priority (PS3.7 9.1.1.1.4).
_MEDIUM, _HIGH = 0x0000, 0x0001
# One association proposes at most 128 presentation contexts (PS3.8 9.3.2.2).
_MAX_CONTEXTS = 128
# Statuses a receiver may answer that still mean "stored" (PS3.4 B.2.3).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


def set_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: Nagle's algorithm costs ~45 ms per message (PERFORMANCE.md)."""
    wrapper = event.assoc.dul.socket
    if wrapper is not None and wrapper.socket is not None:
        wrapper.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def requested_contexts(paths: list[Path]) -> list[tuple[str, list[str]]]:
    """The presentation contexts to propose for ``paths``: per SOP class, one for the
    uncompressed files (either little endian will do) and one per compressed transfer
    syntax, which the receiver has to accept as it is."""
    contexts: dict[tuple[str, str], list[str]] = {}
    for path in paths:
        try:
            meta = read_file_meta_info(path)
        except (OSError, InvalidDicomError) as exc:
            raise ExportError(f"{path.name} cannot be read for sending: {exc}") from exc
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        syntax = str(meta.get("TransferSyntaxUID", ""))
        if not sop_class or not syntax:
            raise ExportError(f"{path.name} has no SOP class or transfer syntax in its file meta")
        if syntax in _UNCOMPRESSED:
            contexts[(sop_class, "")] = _UNCOMPRESSED
        else:
            contexts[(sop_class, syntax)] = [syntax]
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in contexts.items()]


def send_files(
    paths: list[Path],
    destination: Destination,
    calling_ae: str,
    timeout_s: float,
    *,
    urgent: bool = False,
) -> None:
    """C-STORE ``paths`` to ``destination`` in one association, with priority HIGH when
    ``urgent`` and MEDIUM otherwise.

    Raises :class:`ExportError` naming the destination and the status or failure.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    contexts = requested_contexts(paths)
    if len(contexts) > _MAX_CONTEXTS:
        raise ExportError(
            f"{len(contexts)} presentation contexts needed for one association;"
            f" at most {_MAX_CONTEXTS}"
        )
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
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
        priority = _HIGH if urgent else _MEDIUM
        for message_id, path in enumerate(paths, start=1):
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds, msg_id=message_id, priority=priority)
            code = int(status.Status) if status is not None and "Status" in status else None
            if code is None:
                raise ExportError(f"destination {where} gave no C-STORE response for {path.name}")
            if code not in _STORED:
                raise ExportError(f"destination {where} answered 0x{code:04X} to {path.name}")
    finally:
        if assoc.is_established:
            assoc.release()
