"""What ingest reads from a received file, and the checks it must pass to be stored.

The file is read once with large values deferred (pixel data is never loaded), and
every top-level element's declared length is checked against the bytes that
arrived: pydicom seeks past a deferred value without noticing that the file ends
first, so a truncated dataset would otherwise be acknowledged.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement

from infergate.errors import InvalidInstanceError, UIDMismatchError

# PS3.5 9.1: digits and dots, no empty component, at most 64 characters. Leading zeros
# in a component are not conformant either, but real scanners send them; they are
# harmless here because no file name is ever made from a UID.
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_MAX = 64

_UNDEFINED_LENGTH = 0xFFFFFFFF
# Values longer than this are not read, only located.
_DEFER_BYTES = 4096


@dataclass(frozen=True)
class InstanceHeader:
    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    modality: str


def read_header(path: Path, announced_uid: str, *, deflated: bool = False) -> InstanceHeader:
    """The identifying attributes of the received file at ``path``.

    A ``deflated`` dataset is parsed from its inflated copy, whose size the caller has
    bounded; its values are read, not deferred, since offsets are not the file's.

    Raises :class:`InvalidInstanceError` when the dataset cannot be parsed, is
    truncated, lacks an identifying attribute or holds a non-conformant UID, and
    :class:`UIDMismatchError` when its SOP Instance UID is not ``announced_uid``.
    """
    try:
        ds = pydicom.dcmread(path, defer_size=None if deflated else _DEFER_BYTES)
        _check_complete(ds, path.stat().st_size)
        values = {
            "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
            "sop_class_uid": str(ds.get("SOPClassUID", "")),
            "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "study_uid": str(ds.get("StudyInstanceUID", "")),
            "modality": str(ds.get("Modality", "")),
        }
    except InvalidInstanceError:
        raise
    except Exception as exc:  # pydicom raises many types for a broken stream
        raise InvalidInstanceError(f"dataset cannot be decoded: {type(exc).__name__}") from exc
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise InvalidInstanceError(f"dataset lacks {', '.join(missing)}")
    for name in ("sop_instance_uid", "sop_class_uid", "series_uid", "study_uid"):
        uid = values[name]
        if len(uid) > _UID_MAX or not _UID.fullmatch(uid):
            # The value itself is not logged: it is not a UID, so it may be anything.
            raise InvalidInstanceError(f"{name} is not a conformant UID ({len(uid)} characters)")
    if values["sop_instance_uid"] != announced_uid:
        raise UIDMismatchError("SOP Instance UID in the dataset differs from the C-STORE request")
    return InstanceHeader(**values)


def _check_complete(ds: pydicom.Dataset, file_size: int) -> None:
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset converts (reads) elements
        element = ds.get_item(tag, keep_deferred=True)
        if not isinstance(element, RawDataElement) or element.length == _UNDEFINED_LENGTH:
            continue
        if element.value is None:  # deferred: only its place in the file is known
            end = element.value_tell + element.length
            if end > file_size:
                raise InvalidInstanceError(
                    f"dataset is truncated: element {tag} declares {element.length} bytes,"
                    f" {max(file_size - element.value_tell, 0)} arrived"
                )
        elif len(element.value) != element.length:
            raise InvalidInstanceError(f"dataset is truncated inside element {tag}")


def sha256_of(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()
