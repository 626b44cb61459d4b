"""A bounded walk over the top-level elements of a received, encoded dataset.

Ingest's fast path: it locates every top-level element, checks that each one ends
inside the file, and reads the few identifying values ingest needs, without building
a pydicom Dataset (which costs more than the rest of the C-STORE handler together).
It understands the common case completely and declines (returns None) on anything
else: an unknown VR, an undefined-length UN, nesting deeper than ``MAX_DEPTH``, bytes
left over at the end, or an element that runs past the end of the file. The caller
then asks pydicom, which stays the authority on every unusual dataset.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping

# The identifying attributes ingest reads, by tag.
WANTED: Mapping[int, str] = {
    0x00080016: "sop_class_uid",
    0x00080018: "sop_instance_uid",
    0x00080060: "modality",
    0x0020000D: "study_uid",
    0x0020000E: "series_uid",
}
MAX_DEPTH = 16

Encoded = bytes | memoryview | mmap.mmap

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
# VRs whose explicit encoding has two reserved bytes and a 32-bit length (PS3.5 7.1.2).
LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {
        b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US",
    }
)  # fmt: skip


class _DeclinedError(Exception):
    """The walk met something it does not handle; pydicom decides instead."""


class _Walker:
    def __init__(self, data: Encoded, explicit: bool, little: bool) -> None:
        self.data = data
        self.end = len(data)
        self.explicit = explicit
        order = "<" if little else ">"
        self.tag = struct.Struct(f"{order}HH")
        self.u16 = struct.Struct(f"{order}H")
        self.u32 = struct.Struct(f"{order}L")

    def element(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, length, offset of the value) of the element at ``pos``."""
        if pos + 8 > self.end:
            raise _DeclinedError
        group, number = self.tag.unpack_from(self.data, pos)
        tag = group << 16 | number
        if group == 0xFFFE or not self.explicit:  # item tags never carry a VR
            return tag, None, self.u32.unpack_from(self.data, pos + 4)[0], pos + 8
        vr = bytes(self.data[pos + 4 : pos + 6])
        if vr in _SHORT_VRS:
            return tag, vr, self.u16.unpack_from(self.data, pos + 6)[0], pos + 8
        if vr in LONG_VRS and pos + 12 <= self.end:
            return tag, vr, self.u32.unpack_from(self.data, pos + 8)[0], pos + 12
        raise _DeclinedError

    def dataset(self, pos: int, depth: int, values: dict[str, str] | None) -> int:
        """Walk a dataset from ``pos`` to the end of the data, or to an item delimiter
        when nested; returns the offset after it."""
        while pos < self.end:
            tag, vr, length, value = self.element(pos)
            if tag == _ITEM_END and depth > 0:
                return value
            if tag >> 16 == 0xFFFE:  # an item or delimiter where an element belongs
                raise _DeclinedError
            if length == _UNDEFINED:
                if vr == b"UN":  # its content is Implicit VR whatever the syntax (PS3.5 6.2.2)
                    raise _DeclinedError
                pos = self.sequence(value, depth + 1)
                continue
            pos = value + length
            if pos > self.end:
                raise _DeclinedError
            if values is not None and tag in WANTED:
                text = bytes(self.data[value:pos]).decode("ascii", errors="replace")
                values[WANTED[tag]] = text.strip("\0 ")
        if depth > 0:  # a nested dataset of undefined length must end in a delimiter
            raise _DeclinedError
        return pos

    def sequence(self, pos: int, depth: int) -> int:
        """Skip the items of an undefined-length sequence or encapsulated pixel data."""
        if depth > MAX_DEPTH:
            raise _DeclinedError
        while True:
            tag, _, length, value = self.element(pos)
            if tag == _SEQUENCE_END:
                return value
            if tag != _ITEM:
                raise _DeclinedError
            if length == _UNDEFINED:
                pos = self.dataset(value, depth, None)
            else:
                pos = value + length
                if pos > self.end:
                    raise _DeclinedError


def identifying_values(
    data: Encoded, start: int, *, explicit: bool, little: bool
) -> dict[str, str] | None:
    """The WANTED values of the dataset encoded in ``data[start:]``, by name.

    None when the walk declines (see the module docstring). A returned mapping
    lacks the names whose element is absent.
    """
    walker = _Walker(data, explicit, little)
    values: dict[str, str] = {}
    try:
        walker.dataset(start, 0, values)
    except (_DeclinedError, struct.error):
        return None
    return values
