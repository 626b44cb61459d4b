"""What ingest reads from a received file, and the checks it must pass to be stored.

Pixel data is never loaded, and every top-level element's declared length is checked
against the bytes that arrived (a truncated dataset must not be acknowledged). The
common case goes through ``elements`` (a lean walk over the encoded elements);
whatever it declines is read by pydicom, with large values deferred: pydicom seeks
past a deferred value without noticing that the file ends first, hence the check.
"""

from __future__ import annotations

import mmap
import re
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian

from infergate.dicom.elements import identifying_values
from infergate.errors import InvalidInstanceError, UIDMismatchError
from infergate.ingest.incoming import dataset_offset

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


def read_header(path: Path, announced_uid: str, transfer_syntax: UID) -> InstanceHeader:
    """The identifying attributes of the received file at ``path``.

    The file is as ingest writes it (``incoming``): preamble, file meta, then the dataset in
    ``transfer_syntax``. A deflated dataset is parsed by pydicom from its inflated
    copy, whose size the caller has bounded.

    Raises :class:`InvalidInstanceError` when the dataset cannot be parsed, is
    truncated, lacks an identifying attribute or holds a non-conformant UID, and
    :class:`UIDMismatchError` when its SOP Instance UID is not ``announced_uid``.
    """
    deflated = transfer_syntax == DeflatedExplicitVRLittleEndian
    found = None if deflated else _walk(path, transfer_syntax)
    values = found if found is not None else _read_with_pydicom(path, deflated=deflated)
    values = {name: values.get(name, "") for name in _NAMES}
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


_NAMES = ("sop_instance_uid", "sop_class_uid", "series_uid", "study_uid", "modality")


def _walk(path: Path, transfer_syntax: UID) -> dict[str, str] | None:
    """The fast path: None when the file is empty, odd, or the walk declines."""
    with path.open("rb") as handle:
        try:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        except ValueError:  # an empty file cannot be mapped
            return None
    with data:
        start = dataset_offset(data)
        if start is None:
            return None
        return identifying_values(
            data,
            start,
            explicit=not transfer_syntax.is_implicit_VR,
            little=transfer_syntax != ExplicitVRBigEndian,
        )


def _read_with_pydicom(path: Path, *, deflated: bool) -> dict[str, str]:
    """The slow path: whatever the walk declined. A deflated dataset's values are read,
    not deferred, since its offsets are not the file's."""
    try:
        ds = pydicom.dcmread(path, defer_size=None if deflated else _DEFER_BYTES)
        _check_complete(ds, path.stat().st_size)
        return {
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
