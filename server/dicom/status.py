"""DICOM status codes, and the one place our exceptions become statuses."""

from __future__ import annotations

from enum import IntEnum

from infergate.errors import (
    InfergateError,
    InstanceTooLargeError,
    InvalidInstanceError,
    SpoolFullError,
    UIDMismatchError,
)


class Status(IntEnum):
    """DIMSE statuses (PS3.4 Annex B.2.3, PS3.7 Annex C) that Infergate answers."""

    SUCCESS = 0x0000
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    UNRECOGNIZED_OPERATION = 0x0211
    OUT_OF_RESOURCES = 0xA700
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def status_for(exc: InfergateError) -> Status:
    """The status a C-STORE requester gets for ``exc``."""
    if isinstance(exc, SpoolFullError | InstanceTooLargeError):
        return Status.OUT_OF_RESOURCES
    if isinstance(exc, UIDMismatchError):
        return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
    if isinstance(exc, InvalidInstanceError):
        return Status.CANNOT_UNDERSTAND
    return Status.PROCESSING_FAILURE
