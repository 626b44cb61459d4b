"""Guards on each accepted connection that pynetdicom's defaults leave open.

- A read timeout on the socket: pynetdicom's accepted sockets block without one, so
  a peer that stalls in the middle of a PDU would hold its thread and its slot for
  ever. With it, the read fails after the network timeout and the connection closes.
- A cap on every declared PDU length, checked when the 6-byte header has been read
  and before any of the body is: pynetdicom otherwise keeps reading whatever length
  a peer declares (up to 4 GiB) into memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pynetdicom.transport import AssociationSocket

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
        return read(nr_bytes)

    # pynetdicom calls the socket wrapper's recv; shadow it for this connection only.
    setattr(wrapper, "recv", recv)  # noqa: B010 - an instance attribute on purpose
