"""The rows the state store takes and gives: plain frozen records, no queries."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from infergate.codes import Code
from infergate.config import Destination
from infergate.work.states import (
    DeliveryState,
    JobKind,
    JobState,
    NotificationState,
    Priority,
    ResultKind,
    ResultState,
)


@dataclass(frozen=True)
class InstanceRecord:
    """One durably spooled instance, as ingest reports it."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    modality: str
    path: Path
    size: int
    association_id: str
    calling_ae: str
    called_ae: str
    sha256: str


class Arrival(Enum):
    """What a received instance turned out to be."""

    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID, same bytes
    CHANGED_KEPT = "changed_kept"  # same UID, other bytes; the first one stays
    CHANGED_REPLACED = "changed_replaced"  # same UID, other bytes; this one replaces it


@dataclass(frozen=True)
class ArrivalOutcome:
    arrival: Arrival
    # The file no longer referenced once a changed instance replaced it.
    superseded_path: Path | None = None


@dataclass(frozen=True)
class SeriesRow:
    series_uid: str
    study_uid: str
    modality: str
    calling_ae: str
    called_ae: str
    last_received_at: float
    instance_count: int
    generation: int
    first_received_at: float = 0.0  # of this generation
    # When an association that sent instances of it was released (a hint), if ever.
    released_at: float | None = None
    # Associations still open that sent instances of it: the release hint waits for them.
    open_senders: int = 0


@dataclass(frozen=True)
class JobRow:
    job_id: str
    series_uid: str
    study_uid: str
    kind: JobKind
    plugin: str  # '' for a forward job
    state: JobState
    attempts: int
    error: str | None
    priority: Priority = "normal"  # urgent jobs run before normal ones
    interruptions: int = 0  # runs cut short by a process death
    started_at: float | None = None  # of the current or last run


@dataclass(frozen=True)
class ResultRow:
    """A result object written to disk, to be delivered by the outbox."""

    sop_instance_uid: str
    job_id: str
    kind: ResultKind
    path: Path
    # Urgent results (a finding that cannot wait) are sent first, with C-STORE priority HIGH.
    priority: Priority = "normal"


@dataclass(frozen=True)
class UnplannedResult:
    """A result the outbox has not yet put into a delivery, with what picks its
    destination: the called AE title its series was sent to and its job's kind."""

    result: ResultRow
    study_uid: str
    called_ae: str
    job_kind: JobKind
    calling_ae: str = ""
    sender_address: str | None = None  # where its series came from, if known


@dataclass(frozen=True)
class DeliveryRow:
    """One study's results on their way to one destination."""

    delivery_id: str
    study_uid: str
    destination: Destination
    calling_ae: str
    state: DeliveryState
    priority: Priority
    attempts: int
    created_at: float
    first_attempt_at: float | None
    next_attempt_at: float
    outcome: str | None  # the class of the last attempt's outcome
    reason: str | None

    @property
    def destination_key(self) -> str:
        d = self.destination
        return f"{d.ae_title}@{d.host}:{d.port}"


@dataclass(frozen=True)
class DeliveryItem:
    """One object of a delivery, with its own outcome there."""

    sop_instance_uid: str
    kind: ResultKind
    path: Path
    priority: Priority
    state: ResultState
    status: int | None = None
    reason: str | None = None


@dataclass(frozen=True)
class AssociationAudit:
    """One association as the audit trail keeps it."""

    association_id: str
    peer_address: str
    peer_port: int
    calling_ae: str
    called_ae: str
    tls: bool
    outcome: str
    reason: str | None
    started_at: float
    ended_at: float | None = None
    instances: int = 0
    bytes: int = 0
    failures: int = 0
    # The listener process that served it, so a dead one's associations can be ended.
    process_id: int = 0
    # The gateway node it came to ('' before there were several).
    node: str = ""


@dataclass(frozen=True)
class NewJob:
    job_id: str
    kind: JobKind
    plugin: str = ""  # the plugin of an inference job
    priority: Priority = "normal"
    # Why it runs: routing's decisions and how the series was completed (JSON text).
    route: str | None = None


@dataclass(frozen=True)
class CriticalFinding:
    """A finding a person must hear of now: its codes and the report that has it (no
    patient data; the messages read what their receivers need from the report)."""

    name: Code
    value: Code
    segment_number: int | None
    plugin: str
    plugin_version: str
    title: str
    report_uid: str


@dataclass(frozen=True)
class NotificationRow:
    """One critical finding on its way to one receiver."""

    notification_id: str
    job_id: str
    receiver: str
    finding: CriticalFinding
    report_path: Path
    state: NotificationState
    attempts: int
    first_attempt_at: float | None
    reason: str | None


@dataclass(frozen=True)
class NotificationView:
    """A notification as the admin API and the commands show it."""

    notification_id: str
    job_id: str
    receiver: str
    finding: str  # in words: "Hemorrhage: Present"
    plugin: str
    report_uid: str
    state: str
    attempts: int
    created_at: float
    updated_at: float
    reason: str | None
