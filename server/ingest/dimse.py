"""DIMSE command sets (PS3.7 section 9 and Annex E) as the listener reads and answers them.

A command set is always Implicit VR Little Endian and holds a few elements of group
0000. Reading one means finding six values; writing a response, five or six. Doing
that directly costs microseconds, where a pydicom Dataset built, validated and
encoded twice (once to learn its group length) costs most of a millisecond for
every instance received.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from infergate.errors import AssociationError

C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATASET = 0x0101

_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")

# (0000,eeee) elements read from a request, by element number.
_AFFECTED_SOP_CLASS, _COMMAND_FIELD, _MESSAGE_ID = 0x0002, 0x0100, 0x0110
_DATASET_TYPE, _AFFECTED_SOP_INSTANCE = 0x0800, 0x1000
_RESPONDED_ID, _STATUS, _ERROR_COMMENT = 0x0120, 0x0900, 0x0902
_ERROR_COMMENT_MAX = 64  # LO


@dataclass(frozen=True)
class Command:
    """The parts of a DIMSE request the listener acts on."""

    field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_dataset: bool

    @property
    def is_response(self) -> bool:
        return bool(self.field & RESPONSE_BIT)


def decode_command(data: bytes | bytearray) -> Command:
    """Read a command set; raises :class:`AssociationError` when it is not one."""
    values: dict[int, bytes] = {}
    offset = 0
    while offset < len(data):
        if offset + _ELEMENT.size > len(data):
            raise AssociationError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, offset)
        start = offset + _ELEMENT.size
        offset = start + length
        if group != 0x0000 or offset > len(data):
            raise AssociationError(
                "command set holds an element outside group 0000 or past its end"
            )
        values[element] = bytes(data[start:offset])
    try:
        field = _US.unpack(values[_COMMAND_FIELD])[0]
        message_id = _US.unpack(values.get(_MESSAGE_ID) or values[_RESPONDED_ID])[0]
        dataset_type = _US.unpack(values[_DATASET_TYPE])[0]
    except (KeyError, struct.error) as exc:
        raise AssociationError(
            "command set lacks its command field, message id or data set type"
        ) from exc
    return Command(
        field=field,
        message_id=message_id,
        sop_class_uid=_text(values.get(_AFFECTED_SOP_CLASS, b"")),
        sop_instance_uid=_text(values.get(_AFFECTED_SOP_INSTANCE, b"")),
        has_dataset=dataset_type != NO_DATASET,
    )


def _text(value: bytes) -> str:
    return value.decode("ascii", errors="replace").rstrip("\0 ")


def encode_response(request: Command, status: int, error_comment: str | None = None) -> bytes:
    """The response to ``request`` with ``status``: affected SOP class and instance
    echoed, no data set, and an error comment (at most 64 characters) if given."""
    body = [
        _uid(_AFFECTED_SOP_CLASS, request.sop_class_uid) if request.sop_class_uid else b"",
        _us(_COMMAND_FIELD, request.field | RESPONSE_BIT),
        _us(_RESPONDED_ID, request.message_id),
        _us(_DATASET_TYPE, NO_DATASET),
        _us(_STATUS, status),
    ]
    if error_comment:
        text = error_comment.encode("ascii", errors="replace")[:_ERROR_COMMENT_MAX]
        body.append(_element(_ERROR_COMMENT, text + b" " * (len(text) % 2)))
    if request.sop_instance_uid:
        body.append(_uid(_AFFECTED_SOP_INSTANCE, request.sop_instance_uid))
    encoded = b"".join(body)
    return _element(0x0000, struct.pack("<L", len(encoded))) + encoded


def _element(element: int, value: bytes) -> bytes:
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def _us(element: int, value: int) -> bytes:
    return _element(element, _US.pack(value))


def _uid(element: int, value: str) -> bytes:
    raw = value.encode("ascii", errors="replace")
    return _element(element, raw + b"\0" * (len(raw) % 2))
