"""Guards against what pynetdicom's and pydicom's defaults leave open.

- A read timeout on the socket: pynetdicom's accepted sockets block without one, so
  a peer that stalls in the middle of a PDU would hold its thread and its slot for
  ever. With it, the read fails after the network timeout and the connection closes.
- A cap on every declared PDU length, checked when the 6-byte header has been read
  and before any of the body is: pynetdicom otherwise keeps reading whatever length
  a peer declares (up to 4 GiB) into memory. The body is then read into one buffer of
  that size, in as few calls as the kernel allows (pynetdicom reads 4 KiB at a time
  and grows a bytearray: ~130 calls for one 512 KiB image).
- A bound on how far a Deflated dataset may inflate, checked as a stream.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pynetdicom.transport import AssociationSocket

from infergate.errors import InstanceTooLargeError, InvalidInstanceError

A_ASSOCIATE_RQ, P_DATA_TF = 0x01, 0x04
_HEADER = 6
# A-RELEASE and A-ABORT PDUs carry 4 bytes; nothing else is expected from a requestor.
_SMALL_PDU_BYTES = 1024


@dataclass(frozen=True)
class PduLimits:
    association_request_bytes: int
    pdata_bytes: int

    def for_type(self, pdu_type: int) -> int:
        if pdu_type == A_ASSOCIATE_RQ:
            return self.association_request_bytes
        if pdu_type == P_DATA_TF:
            return self.pdata_bytes
        return _SMALL_PDU_BYTES


class PduTooLargeError(OSError):
    """A peer declared a PDU longer than we accept. An OSError, so pynetdicom closes."""


def guard_connection(
    wrapper: AssociationSocket,
    timeout_s: float,
    limits: PduLimits,
    on_refused: Callable[[int, int, int], None],
) -> None:
    """Set the read timeout and the PDU length caps on an accepted connection.

    ``on_refused(pdu_type, declared, limit)`` is called before the connection closes.
    """
    raw = wrapper.socket
    if raw is not None:
        raw.settimeout(timeout_s)
    read = wrapper.recv
    expecting_header = True
    pdu_type = 0

    def recv(nr_bytes: int) -> bytearray:
        # pynetdicom reads each PDU as recv(6) for the header, then recv(length).
        nonlocal expecting_header, pdu_type
        if expecting_header:
            data = read(nr_bytes)
            if len(data) == _HEADER:
                pdu_type = data[0]
                expecting_header = False
            return data
        expecting_header = True
        limit = limits.for_type(pdu_type)
        if nr_bytes > limit:
            on_refused(pdu_type, nr_bytes, limit)
            raise PduTooLargeError(f"PDU of type 0x{pdu_type:02X} declares {nr_bytes} bytes")
        return _read_exactly(wrapper, nr_bytes)

    # pynetdicom calls the socket wrapper's recv; shadow it for this connection only.
    setattr(wrapper, "recv", recv)  # noqa: B010 - an instance attribute on purpose


def _read_exactly(wrapper: AssociationSocket, nr_bytes: int) -> bytearray:
    """``nr_bytes`` from the connection, or fewer if it closes first (as pynetdicom's recv:
    the caller then finds the PDU short). Timeouts and errors propagate as OSError."""
    sock = wrapper.socket  # read now: TLS may have replaced the plain socket
    if sock is None:
        return bytearray()
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    received = 0
    while received < nr_bytes:
        count = sock.recv_into(view[received:])
        if count == 0:
            return buffer[:received]
        received += count
    return buffer


_PREAMBLE_AND_PREFIX = 132
_META_GROUP_LENGTH_ELEMENT = 12  # (0002,0000) UL, explicit VR: tag, VR, length, value
_CHUNK = 1 << 16


def check_inflated_size(path: Path, limit: int) -> None:
    """Inflate a Deflated Explicit VR dataset as a stream and refuse it past ``limit``.

    pydicom inflates a deflated dataset whole, in memory, before parsing it; a few
    kilobytes can inflate to gigabytes. This counts the inflated bytes, keeping none.
    The file is as pynetdicom writes it: preamble, prefix, file meta starting with its
    group length, then the deflated dataset.
    """
    with path.open("rb") as handle:
        handle.seek(_PREAMBLE_AND_PREFIX)
        element = handle.read(_META_GROUP_LENGTH_ELEMENT)
        if len(element) != _META_GROUP_LENGTH_ELEMENT or element[:4] != b"\x02\x00\x00\x00":
            raise InvalidInstanceError("file meta does not start with its group length")
        handle.seek(struct.unpack("<L", element[8:12])[0], 1)
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        while chunk := handle.read(_CHUNK):
            pending = chunk
            while pending:
                total += len(inflater.decompress(pending, _CHUNK))
                if total > limit:
                    raise InstanceTooLargeError(
                        f"deflated dataset inflates past ingest.max_inflated_bytes ({limit})"
                    )
                pending = inflater.unconsumed_tail
