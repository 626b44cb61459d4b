"""What a destination's answer means for a delivery: the outcome classes and the
C-STORE statuses in each (PS3.4 B.2.3, PS3.7 C), with pynetdicom's descriptions.

- delivered: success;
- warning (0xB000, 0xB006, 0xB007 and the other warnings): stored, and recorded;
- transient: it may work later (out of resources 0xA7xx, processing failure 0x0110,
  resource limitation 0x0213, cancel, and every failure of the connection or the
  association that is not a permanent A-ASSOCIATE-RJ): retried with backoff;
- permanent: it will not (a permanent A-ASSOCIATE-RJ, 0xA9xx, 0xCxxx, a SOP class the
  destination did not accept, any other failure status): a dead letter at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS, code_to_category


class OutcomeClass(Enum):
    DELIVERED = "delivered"
    WARNING = "warning"
    TRANSIENT = "transient"
    PERMANENT = "permanent"

    @property
    def stored(self) -> bool:
        return self in (OutcomeClass.DELIVERED, OutcomeClass.WARNING)


_TRANSIENT_FAILURES = frozenset({0x0110, 0x0213, 0xFE00})


def classify_status(code: int) -> OutcomeClass:
    """The class of a C-STORE response status."""
    category = code_to_category(code)
    if category == "Success":
        return OutcomeClass.DELIVERED
    if category == "Warning":
        return OutcomeClass.WARNING
    if 0xA700 <= code <= 0xA7FF or code in _TRANSIENT_FAILURES:
        return OutcomeClass.TRANSIENT
    return OutcomeClass.PERMANENT


def describe_status(code: int) -> str:
    """``0xA900 (Data Set Does Not Match SOP Class)``: the code and its meaning."""
    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
    return f"0x{code:04X} ({meaning})" if meaning else f"0x{code:04X}"


@dataclass(frozen=True)
class ObjectOutcome:
    """What became of one object in one association."""

    sop_instance_uid: str
    outcome: OutcomeClass
    reason: str
    status: int | None = None
    # The destination does not take its SOP class at all (no presentation context).
    not_accepted: bool = False


@dataclass(frozen=True)
class AttemptOutcome:
    """One association's outcome: each object that got one, and, when the association
    failed before every object was answered, the class and reason for the rest."""

    objects: tuple[ObjectOutcome, ...]
    failure: OutcomeClass | None = None
    reason: str | None = None
