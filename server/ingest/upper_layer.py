"""The DICOM upper layer on an accepted connection (PS3.8 section 9): PDUs in and out.

Every read has the connection's timeout, so a peer that stalls in the middle of a
PDU is cut off instead of holding its thread. Every declared PDU length is checked
against a cap for its type as soon as the 6-byte header has arrived, before any of
the body is read or allocated; the body then lands in one buffer of that size in as
few ``recv_into`` calls as the kernel allows.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass

from infergate.errors import AssociationError, PduTooLargeError

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ = 0x01, 0x02, 0x03
P_DATA_TF, A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x04, 0x05, 0x06, 0x07

# PS3.8 9.3.8: A-ABORT source (the service provider) and reasons.
ABORT_BY_PROVIDER = 0x02
REASON_NOT_SPECIFIED, UNEXPECTED_PDU, INVALID_PARAMETER_VALUE = 0x00, 0x02, 0x06

_HEADER = struct.Struct(">BxL")
_PDV_HEADER = struct.Struct(">LBB")
# A-RELEASE and A-ABORT PDUs carry 4 bytes; nothing else is expected from a requestor.
_SMALL_PDU_BYTES = 1024
# Message control header of a PDV (PS3.8 E.2): bit 0 command, bit 1 last fragment.
COMMAND, LAST = 0x01, 0x02


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


class PeerClosedError(AssociationError):
    """The peer closed the connection."""


class Connection:
    """One accepted connection (plain or TLS), read and written a whole PDU at a time."""

    def __init__(self, sock: socket.socket, limits: PduLimits, timeout_s: float) -> None:
        self.sock = sock
        self.limits = limits
        self.timeout_s = timeout_s
        self._buffer = bytearray(0)

    def read_pdu(
        self, wait_s: float, *, whole_within_s: float | None = None
    ) -> tuple[int, memoryview]:
        """The next PDU's type and body (the bytes after its 6-byte header), valid until
        the next call.

        The PDU must start within ``wait_s``; once it has, each read of its body must
        return within the connection's timeout, and with ``whole_within_s`` the whole
        PDU must have arrived by then (a peer that drips its request a byte at a time
        never lets a read time out). Raises :class:`PeerClosedError` when the
        connection closes, before or inside a PDU, :class:`PduTooLargeError` past the
        cap, and ``TimeoutError`` (an OSError) when a wait runs out.
        """
        deadline = None if whole_within_s is None else time.monotonic() + whole_within_s
        self.sock.settimeout(wait_s)
        header = self._read_exactly(_HEADER.size, deadline)
        pdu_type, length = _HEADER.unpack(header)
        limit = self.limits.for_type(pdu_type)
        if length > limit:
            raise PduTooLargeError(pdu_type, length, limit)
        self.sock.settimeout(self.timeout_s)
        return pdu_type, self._read_exactly(length, deadline)

    def _read_exactly(self, count: int, deadline: float | None = None) -> memoryview:
        # One buffer per connection, grown as needed: a PDU's body is used up before
        # the next one is read, and a fresh zeroed buffer per PDU costs measurably.
        if len(self._buffer) < count:
            self._buffer = bytearray(count)
        view = memoryview(self._buffer)[:count]
        received = 0
        while received < count:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("the PDU did not arrive whole within its deadline")
                self.sock.settimeout(min(left, self.sock.gettimeout() or left))
            got = self.sock.recv_into(view[received:])
            if got == 0:
                where = "between PDUs" if received == 0 else "in the middle of a PDU"
                raise PeerClosedError(f"the peer closed the connection {where}")
            received += got
        return view

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_abort(self, source: int, reason: int) -> None:
        """An A-ABORT, best effort: the connection may already be gone."""
        with contextlib.suppress(OSError):
            self.sock.sendall(pdu(A_ABORT, bytes([0, 0, source, reason])))

    def close(self, drain_s: float = 0.5) -> None:
        """Close after what was sent has left: half-close, then wait up to ``drain_s``
        for the peer to close its side (closing with unread input would reset the
        connection, and a peer could lose our last PDU)."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self.sock.settimeout(drain_s)
            while self.sock.recv(4096):
                pass
        except OSError:
            pass
        finally:
            self.sock.close()


def pdu(pdu_type: int, body: bytes) -> bytes:
    return _HEADER.pack(pdu_type, len(body)) + body


RELEASE_RP = pdu(A_RELEASE_RP, bytes(4))


def pdvs(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """The presentation data values of a P-DATA-TF body: (context id, control, data).

    Raises :class:`AssociationError` when an item's length does not fit the PDU.
    """
    offset = 0
    while offset < len(body):
        if offset + _PDV_HEADER.size > len(body):
            raise AssociationError("P-DATA-TF ends inside a PDV item header")
        length, context_id, control = _PDV_HEADER.unpack_from(body, offset)
        end = offset + 4 + length
        if length < 2 or end > len(body):
            raise AssociationError(f"P-DATA-TF holds a PDV item of impossible length {length}")
        yield context_id, control, body[offset + _PDV_HEADER.size : end]
        offset = end


def pdata(context_id: int, control: int, data: bytes, max_pdu: int) -> list[bytes]:
    """``data`` as P-DATA-TF PDUs of at most ``max_pdu`` bytes each (0: no limit),
    one PDV each, the last fragment marked as such."""
    room = len(data) if max_pdu == 0 else max(max_pdu - 6, 1)
    chunks = [data[i : i + room] for i in range(0, len(data), room)] or [b""]
    out = []
    for index, chunk in enumerate(chunks):
        flags = control | (LAST if index == len(chunks) - 1 else 0)
        out.append(pdu(P_DATA_TF, _PDV_HEADER.pack(len(chunk) + 2, context_id, flags) + chunk))
    return out
