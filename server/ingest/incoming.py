"""A dataset as it arrives: a DICOM file in the spool's ``tmp/``, hashed as written.

The file gets the 128-byte preamble, ``DICM`` and a file meta group built from the
C-STORE request and the presentation context, then the dataset's fragments exactly
as they arrive (stored as received, never transcoded). The SHA-256 that duplicate
detection needs is taken over the dataset bytes as they pass, so the file is never
read back for it. A file that is not finished (the association ended in the middle
of the dataset, or the instance was refused) is removed by whoever holds it.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
import tempfile
from pathlib import Path

from infergate import __version__
from infergate.dicom.elements import LONG_VRS

# Infergate's implementation class UID (PS3.7 D.3.3.2), a UUID-derived UID (PS3.5 B.2).
IMPLEMENTATION_CLASS_UID = "2.25.143092972379244883166501419910714095225"
IMPLEMENTATION_VERSION_NAME = f"INFERGATE_{__version__}"[:16]

_PREAMBLE = bytes(128) + b"DICM"
# The file meta group starts with its group length: (0002,0000) UL, explicit VR.
_META_GROUP_LENGTH = struct.Struct("<HH2sHL")
HEAD_BYTES = len(_PREAMBLE) + _META_GROUP_LENGTH.size


def dataset_offset(head: bytes | mmap.mmap) -> int | None:
    """Where the dataset starts in a file as ingest writes it (preamble, ``DICM``, the
    file meta group led by its length), from at least the file's first
    ``HEAD_BYTES``; None when the file does not start that way."""
    if len(head) < HEAD_BYTES:
        return None
    group, element, vr, length, meta_length = _META_GROUP_LENGTH.unpack_from(head, len(_PREAMBLE))
    if (group, element, vr, length) != (2, 0, b"UL", 4):
        return None
    return HEAD_BYTES + int(meta_length)


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """The file meta information group (PS3.10 7.1), Explicit VR Little Endian."""
    elements = b"".join(
        (
            _explicit(0x0001, b"OB", b"\x00\x01"),
            _explicit(0x0002, b"UI", _uid(sop_class_uid)),
            _explicit(0x0003, b"UI", _uid(sop_instance_uid)),
            _explicit(0x0010, b"UI", _uid(transfer_syntax)),
            _explicit(0x0012, b"UI", _uid(IMPLEMENTATION_CLASS_UID)),
            _explicit(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
            _explicit(0x0016, b"AE", _padded(source_ae, b" ")) if source_ae else b"",
        )
    )
    return _explicit(0x0000, b"UL", struct.pack("<L", len(elements))) + elements


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in LONG_VRS:
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", errors="replace")
    return raw + pad * (len(raw) % 2)


def _uid(value: str) -> bytes:
    return _padded(value, b"\0")


class IncomingFile:
    """One dataset being received into ``directory``."""

    def __init__(self, directory: Path, meta: bytes) -> None:
        fd, name = tempfile.mkstemp(dir=directory, suffix=".part")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb", buffering=0)
        self._digest = hashlib.sha256()
        self.size = 0  # of the file, as written so far
        self._closed = False
        try:
            self._file.write(_PREAMBLE + meta)
            self.size = len(_PREAMBLE) + len(meta)
        except OSError:
            self.discard()
            raise

    def write(self, fragment: memoryview) -> None:
        self._digest.update(fragment)
        self._file.write(fragment)
        self.size += len(fragment)

    def finish(self) -> str:
        """Close the file (``Spool.adopt`` makes it durable); returns the dataset's SHA-256."""
        self._close()
        return self._digest.hexdigest()

    def discard(self) -> None:
        """Close and remove the file; nothing of it stays visible."""
        self._close()
        self.path.unlink(missing_ok=True)

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._file.close()
