"""The notify loop: each due notification claimed, built from its report, sent, and
its answer recorded (delivered; a retry after a doubling delay up to
``notifications.max_retry_delay_s``, until ``retry_horizon_s`` after the first
attempt; or dead). Every message carries the notification's id, the same for every
attempt, so a receiver that got one before a crash can tell it is the same.
"""

from __future__ import annotations

import datetime
import time

import pydicom
from pydicom.errors import InvalidDicomError

from infergate.config import NotificationReceiver, Settings
from infergate.export.outcomes import OutcomeClass
from infergate.logs import get_logger
from infergate.notify import messages, send
from infergate.store import NotificationRow, Store
from infergate.work.states import NotificationState

log = get_logger(__name__)


def _send(
    receiver: NotificationReceiver, row: NotificationRow, study: messages.Study, timeout_s: float
) -> send.Answer:
    now = datetime.datetime.now(datetime.UTC)
    if receiver.kind == "webhook":
        payload = messages.webhook(row.notification_id, row.finding, study)
        return send.post_json(receiver, str(receiver.url), payload, row.notification_id, timeout_s)
    if receiver.kind == "fhir":
        report = messages.diagnostic_report(row.notification_id, row.finding, study, now)
        url = f"{str(receiver.url).rstrip('/')}/DiagnosticReport"
        # A conditional create: the same report twice (after a crash) is stored once.
        exists = f"identifier=urn:dicom:uid|urn:oid:{row.finding.report_uid}"
        return send.post(
            receiver,
            url,
            report.model_dump_json(exclude_none=True),
            content_type="application/fhir+json",
            extra_headers={"If-None-Exist": exists},
            timeout_s=timeout_s,
        )
    message = messages.oru_r01(
        row.notification_id,
        row.finding,
        study,
        sending=(receiver.sending_application, receiver.sending_facility),
        receiving=(receiver.receiving_application, receiver.receiving_facility),
        at=now,
    )
    return send.mllp(receiver, message, timeout_s)


def _backoff_s(settings: Settings, attempts: int) -> float:
    policy = settings.notifications
    delay: float = min(policy.retry_delay_s * 2 ** max(attempts - 1, 0), policy.max_retry_delay_s)
    return delay


def send_due(store: Store, settings: Settings) -> int:
    """One round: send every due notification once; returns how many were sent."""
    sent = 0
    for row in store.due_notifications(time.time()):
        if not store.claim_notification(row.notification_id, time.time(), settings.node.name):
            continue
        sent += 1
        deliver(store, settings, row)
    return sent


def deliver(store: Store, settings: Settings, row: NotificationRow) -> NotificationState:
    """Send one claimed notification and record its outcome."""
    receiver = settings.notifications.receiver(row.receiver)
    if receiver is None:
        outcome, reason = OutcomeClass.PERMANENT, "the receiver is no longer configured"
    else:
        try:
            report = pydicom.dcmread(row.report_path, stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            outcome, reason = OutcomeClass.PERMANENT, f"its report cannot be read: {exc}"
        else:
            outcome, reason = _send(
                receiver, row, messages.Study.of(report), settings.notifications.timeout_s
            )
    now = time.time()
    first = row.first_attempt_at if row.first_attempt_at is not None else now
    attempts = row.attempts + 1
    if outcome.stored:
        state, next_at = NotificationState.DELIVERED, now
    elif outcome is OutcomeClass.TRANSIENT and now - first < settings.notifications.retry_horizon_s:
        state, next_at = NotificationState.RETRY_WAIT, now + _backoff_s(settings, attempts)
    else:
        state, next_at = NotificationState.DEAD, now
    store.record_notification(
        row.notification_id, state, reason, next_at, now, node=settings.node.name
    )
    event = {
        NotificationState.DELIVERED: "notify.delivered",
        NotificationState.RETRY_WAIT: "notify.retrying",
        NotificationState.DEAD: "notify.dead_letter",
    }[state]
    (log.info if state is NotificationState.DELIVERED else log.warning)(
        event,
        notification_id=row.notification_id,
        job_id=row.job_id,
        receiver=row.receiver,
        kind=None if receiver is None else receiver.kind,
        finding=f"{row.finding.name.meaning}: {row.finding.value.meaning}",
        plugin=row.finding.plugin,
        attempt=attempts,
        reason=reason,
    )
    return state
