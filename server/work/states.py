"""Every state a unit of work can be in, and the one table of allowed transitions.

Plain enums, not ``StrEnum``: a delivery's ``pending`` and a result's are different
states and must not compare equal. The state store keeps their values, and changes a
state only by an UPDATE that names the transition (from which states to which) and is
checked against this table first (``store.db.set_state``), as pynetdicom's ``fsm.py``
tabulates its state machine: a transition the table does not list is a bug and is
refused; a row that is in another state by now is left alone and the caller is told
(a job that ran past its deadline and was failed meanwhile cannot then be done).
"""

from __future__ import annotations

from enum import Enum
from typing import Literal

# Urgent work (a triage plugin, a finding that cannot wait) goes before normal work.
Priority = Literal["urgent", "normal"]
PRIORITY_RANK: dict[Priority, int] = {"urgent": 0, "normal": 1}
PRIORITY_OF_RANK: dict[int, Priority] = {rank: name for name, rank in PRIORITY_RANK.items()}


class SeriesState(Enum):
    RECEIVING = "receiving"  # instances arrive; assembly waits for it to be complete
    COMPLETE = "complete"  # routed, its jobs created; a new instance reopens it


class JobKind(Enum):
    INFERENCE = "inference"  # a plugin's model on Triton, results as SEG and SR
    FORWARD = "forward"  # a series no plugin runs on, sent on as received


class JobState(Enum):
    QUEUED = "queued"  # waiting for a slot (or for its retry time)
    RUNNING = "running"  # a worker has it
    DONE = "done"  # its results are written and handed to the outbox
    FAILED = "failed"  # it cannot succeed; the reason is recorded
    DEAD = "dead"  # dead letter: its runs kept being interrupted by process deaths


class ResultKind(Enum):
    SEG = "seg"
    SR = "sr"
    FORWARDED = "forwarded"  # a received instance, forwarded as it came
    SC = "sc"  # a SEG drawn on a source image, for a destination without Segmentation


class ResultState(Enum):
    """One object's own outcome, within the deliveries that carry it."""

    PENDING = "pending"  # to be sent (or being sent) in its delivery
    DELIVERED = "delivered"  # the destination answered success or a warning
    DEAD = "dead"  # refused for good by the destination (dead letter), with the reason
    KEPT = "kept"  # no destination is configured: it stays on disk
    # A SEG the destination does not store, sent there as Secondary Capture images.
    REPLACED = "replaced"


class DeliveryState(Enum):
    """One study's results on their way to one destination, in one association."""

    PENDING = "pending"  # due now
    SENDING = "sending"  # an association is open for it
    RETRY_WAIT = "retry_wait"  # a transient failure; due again at next_attempt_at
    DELIVERED = "delivered"  # every object has its outcome; none is left to send
    DEAD = "dead"  # refused for good, or failing past the retry horizon (dead letter)


class NotificationState(Enum):
    """One critical finding on its way to one receiver (HL7 v2, FHIR, a webhook)."""

    PENDING = "pending"  # due now
    SENDING = "sending"
    RETRY_WAIT = "retry_wait"  # the receiver is down or busy; due again later
    DELIVERED = "delivered"  # the receiver acknowledged it
    DEAD = "dead"  # refused for good, or failing past the retry horizon


State = SeriesState | JobState | ResultState | DeliveryState | NotificationState

# The one table: for each state, the states it may change to.
TRANSITIONS: dict[State, frozenset[State]] = {
    SeriesState.RECEIVING: frozenset({SeriesState.COMPLETE}),
    SeriesState.COMPLETE: frozenset({SeriesState.RECEIVING}),  # a late instance
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.FAILED}),
    # Back to QUEUED: Triton unavailable (retry later) or the process died (recovery).
    JobState.RUNNING: frozenset({JobState.DONE, JobState.FAILED, JobState.QUEUED, JobState.DEAD}),
    JobState.DONE: frozenset(),  # re-sending its results is a replay of their delivery
    JobState.FAILED: frozenset({JobState.QUEUED}),  # an operator's retry
    JobState.DEAD: frozenset({JobState.QUEUED}),  # an operator's retry
    ResultState.PENDING: frozenset(
        {ResultState.DELIVERED, ResultState.DEAD, ResultState.KEPT, ResultState.REPLACED}
    ),
    ResultState.REPLACED: frozenset({ResultState.PENDING}),  # replay elsewhere
    ResultState.DEAD: frozenset({ResultState.PENDING}),  # replay
    ResultState.KEPT: frozenset({ResultState.PENDING}),  # replay to a destination
    ResultState.DELIVERED: frozenset({ResultState.PENDING}),  # replay on purpose
    DeliveryState.PENDING: frozenset({DeliveryState.SENDING}),
    DeliveryState.SENDING: frozenset(
        {
            DeliveryState.DELIVERED,
            DeliveryState.RETRY_WAIT,
            DeliveryState.DEAD,
            DeliveryState.PENDING,  # the process died during the association
        }
    ),
    DeliveryState.RETRY_WAIT: frozenset({DeliveryState.SENDING, DeliveryState.DEAD}),
    DeliveryState.DELIVERED: frozenset(),
    # A replay opens a new delivery; the dead one stays, the record of what happened.
    DeliveryState.DEAD: frozenset(),
    NotificationState.PENDING: frozenset({NotificationState.SENDING}),
    NotificationState.SENDING: frozenset(
        {
            NotificationState.DELIVERED,
            NotificationState.RETRY_WAIT,
            NotificationState.DEAD,
            NotificationState.PENDING,  # the process died while sending
        }
    ),
    NotificationState.RETRY_WAIT: frozenset({NotificationState.SENDING}),
    NotificationState.DELIVERED: frozenset(),
    NotificationState.DEAD: frozenset({NotificationState.PENDING}),  # an operator's resend
}


def allowed(old: State, new: State) -> bool:
    return new in TRANSITIONS[old]
