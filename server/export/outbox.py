"""The outbox: plans results into deliveries, sends each in one association, and
applies the outcome class of what the destination answered.

Every step is a plain function over the store; the export worker (``export.worker``)
calls them on its own threads, one pool per destination, so a PACS that is slow,
silent or down delays only its own deliveries.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import replace

import structlog

from infergate.config import Destination, Settings
from infergate.export.captures import substitute
from infergate.export.outcomes import AttemptOutcome, OutcomeClass
from infergate.export.scu import send_objects
from infergate.export.stow import stow_objects
from infergate.logs import get_logger
from infergate.ops.metrics import delivery_attempted
from infergate.store import DeliveryItem, DeliveryRow, ResultRow, Store, UnplannedResult
from infergate.work.states import DeliveryState, JobKind, ResultKind, ResultState

log = get_logger(__name__)


def destination_of(settings: Settings, unplanned: UnplannedResult) -> Destination | None:
    """Where a result goes: a forwarded instance to ``routing.unmatched``'s destination;
    a job's result back to its sender when it returns to sender (and the sender has a
    port), else to its called AE title's destination, else ``export.destination``;
    nowhere for what the selftest sent (``ingest.selftest_ae_title``)."""
    if unplanned.called_ae == settings.ingest.selftest_ae_title:
        return None
    if unplanned.job_kind is JobKind.FORWARD:
        return settings.routing.unmatched.destination
    sender = settings.sender_destination(
        unplanned.called_ae, unplanned.calling_ae, unplanned.sender_address
    )
    return sender or settings.destination_for(unplanned.called_ae)


def plan(store: Store, settings: Settings, now: float) -> list[str]:
    """Put every result not yet planned into the open delivery of its study and
    destination (or keep it on disk, with the reason, when it has no destination);
    returns the deliveries that got something."""
    groups: dict[tuple[str, Destination, str], list[ResultRow]] = defaultdict(list)
    for unplanned in store.unplanned_results():
        called_ae = unplanned.called_ae
        destination = destination_of(settings, unplanned)
        result = unplanned.result
        if destination is None:
            reason = (
                f"no destination for called AE title {called_ae}"
                " (export.destination, ingest.called_aes); results stay on disk"
            )
            store.keep_results([result.sop_instance_uid], reason, now)
            log.warning(
                "export.skipped", job_id=result.job_id, reason=reason, paths=[str(result.path)]
            )
            continue
        # Results are sent with the called title as the calling AE title.
        groups[(unplanned.study_uid, destination, called_ae)].append(result)
    planned = []
    for (study_uid, destination, calling_ae), results in groups.items():
        delivery_id = store.plan_delivery(study_uid, destination, calling_ae, results, now)
        planned.append(delivery_id)
        log.info(
            "export.planned",
            delivery_id=delivery_id,
            study_uid=study_uid,
            destination=destination.ae_title,
            objects=len(results),
        )
    return planned


def backoff_s(settings: Settings, attempts: int) -> float:
    """The wait before attempt ``attempts + 1``: doubling from ``retry_delay_s``, capped."""
    export = settings.export
    return float(min(export.retry_delay_s * 2 ** max(attempts - 1, 0), export.max_retry_delay_s))


def deliver(store: Store, settings: Settings, delivery: DeliveryRow) -> DeliveryState:
    """Send what is still pending in a claimed delivery, in one association, and record
    each object's outcome and the delivery's next state; returns that state."""
    items = store.delivery_items(delivery.delivery_id, ResultState.PENDING)
    started = time.perf_counter()
    urgent = any(item.priority == "urgent" for item in items)
    with structlog.contextvars.bound_contextvars(
        delivery_id=delivery.delivery_id, study_uid=delivery.study_uid
    ):
        destination = settings.configured_destination(delivery.destination)
        if destination.segmentation == "secondary_capture":
            items = _without_seg(
                store, settings, delivery, items, "the destination takes no Segmentation"
            )
        attempt = _send(settings, delivery, destination, items, urgent=urgent)
        if destination.segmentation == "auto":
            items, attempt = _captures_for_refused(
                store, settings, delivery, destination, items=items, attempt=attempt, urgent=urgent
            )
        return _apply(
            store, settings, delivery, items, attempt, duration_s=time.perf_counter() - started
        )


def _send(
    settings: Settings,
    delivery: DeliveryRow,
    destination: Destination,
    items: list[DeliveryItem],
    *,
    urgent: bool,
) -> AttemptOutcome:
    objects = [(item.sop_instance_uid, item.path) for item in items]
    if destination.dicomweb:
        return stow_objects(objects, destination, settings.export.timeout_s)
    return send_objects(
        objects, destination, delivery.calling_ae, settings.export.timeout_s, urgent=urgent
    )


def _without_seg(
    store: Store,
    settings: Settings,
    delivery: DeliveryRow,
    items: list[DeliveryItem],
    why: str,
) -> list[DeliveryItem]:
    """``items`` with each SEG replaced by its Secondary Capture images, where they can
    be made (where not, the SEG is sent and its outcome is the destination's)."""
    kept: list[DeliveryItem] = []
    for item in items:
        drawn = (
            substitute(store, settings, delivery, item, why)
            if item.kind is ResultKind.SEG
            else [item]
        )
        kept += [item] if isinstance(drawn, str) else drawn
    return kept


def _captures_for_refused(
    store: Store,
    settings: Settings,
    delivery: DeliveryRow,
    destination: Destination,
    *,
    items: list[DeliveryItem],
    attempt: AttemptOutcome,
    urgent: bool,
) -> tuple[list[DeliveryItem], AttemptOutcome]:
    """A SEG the association did not accept is replaced by its Secondary Capture
    images, sent at once in a second association; the outcomes of both."""
    kinds = {item.sop_instance_uid: item for item in items}
    refused = [
        o
        for o in attempt.objects
        if o.not_accepted and kinds[o.sop_instance_uid].kind is ResultKind.SEG
    ]
    if not refused or attempt.failure is not None:
        return items, attempt
    drawn: list[DeliveryItem] = []
    outcomes = list(attempt.objects)
    for outcome in refused:
        made = substitute(
            store, settings, delivery, kinds[outcome.sop_instance_uid], outcome.reason
        )
        if isinstance(made, str):
            index = outcomes.index(outcome)
            outcomes[index] = replace(outcome, reason=f"{outcome.reason}; {made}")
            continue
        outcomes.remove(outcome)  # replaced in the store: no outcome of its own
        drawn += made
    if not drawn:
        return items, replace(attempt, objects=tuple(outcomes))
    second = _send(settings, delivery, destination, drawn, urgent=urgent)
    replaced = {o.sop_instance_uid for o in refused} - {o.sop_instance_uid for o in outcomes}
    return (
        [item for item in items if item.sop_instance_uid not in replaced] + drawn,
        AttemptOutcome((*outcomes, *second.objects), second.failure, second.reason),
    )


def _apply(
    store: Store,
    settings: Settings,
    delivery: DeliveryRow,
    items: list[DeliveryItem],
    attempt: AttemptOutcome,
    *,
    duration_s: float,
) -> DeliveryState:
    now = time.time()
    by_uid = {item.sop_instance_uid: item for item in items}
    changed = [
        replace(by_uid[o.sop_instance_uid], state=answered, status=o.status, reason=o.reason)
        for o in attempt.objects
        if (answered := _object_state(o.outcome)) is not None
    ]

    def remaining() -> list[DeliveryItem]:
        done = {c.sop_instance_uid for c in changed}
        return [item for item in items if item.sop_instance_uid not in done]

    if attempt.failure is OutcomeClass.PERMANENT:
        changed += [replace(i, state=ResultState.DEAD, reason=attempt.reason) for i in remaining()]
    transient = [o.reason for o in attempt.objects if o.outcome is OutcomeClass.TRANSIENT]
    reason = attempt.reason or (transient[0] if transient else None)
    first = delivery.first_attempt_at if delivery.first_attempt_at is not None else now
    if remaining() and now - first >= settings.export.retry_horizon_s:
        reason = (
            f"still failing {now - first:.0f} s after the first attempt"
            f" (export.retry_horizon_s): {reason}"
        )
        changed += [replace(i, state=ResultState.DEAD, reason=reason) for i in remaining()]
        state, outcome_class = DeliveryState.DEAD, OutcomeClass.TRANSIENT
    elif remaining():
        state, outcome_class = DeliveryState.RETRY_WAIT, OutcomeClass.TRANSIENT
    elif dead := [c for c in changed if c.state is ResultState.DEAD] + store.delivery_items(
        delivery.delivery_id, ResultState.DEAD
    ):
        state, outcome_class = DeliveryState.DEAD, OutcomeClass.PERMANENT
        reason = "; ".join(sorted({c.reason or "" for c in dead}))
    else:
        state = DeliveryState.DELIVERED
        warned = any(o.outcome is OutcomeClass.WARNING for o in attempt.objects)
        outcome_class = OutcomeClass.WARNING if warned else OutcomeClass.DELIVERED
        reason = None
    configured = settings.configured_destination(delivery.destination)
    alternate = configured.alternate
    handed: list[DeliveryItem] = []
    if alternate is not None and (
        state is DeliveryState.DEAD
        or (
            state is DeliveryState.RETRY_WAIT
            and delivery.attempts >= configured.alternate_after_transient
        )
    ):
        reason = f"handed over to the alternate destination {alternate.ae_title} after: {reason}"
        changed += [replace(i, state=ResultState.DEAD, reason=reason) for i in remaining()]
        handed = [
            *(c for c in changed if c.state is ResultState.DEAD),
            *store.delivery_items(delivery.delivery_id, ResultState.DEAD),
        ]
        state = DeliveryState.DEAD
    delay = backoff_s(settings, delivery.attempts)
    store.record_attempt(
        delivery.delivery_id,
        changed,
        state=state,
        outcome=outcome_class.value,
        reason=reason,
        next_attempt_at=now + delay if state is DeliveryState.RETRY_WAIT else now,
        now=now,
        node=settings.node.name,
    )
    delivery_attempted(delivery.destination.ae_title, outcome_class.value, duration_s)
    _log(
        delivery,
        changed=changed,
        state=state,
        outcome_class=outcome_class,
        reason=reason,
        delay=delay,
        duration_s=duration_s,
        attempt=attempt,
    )
    if alternate is not None and handed:
        _hand_over(store, delivery, alternate, handed, now)
    return state


def _hand_over(
    store: Store,
    delivery: DeliveryRow,
    alternate: Destination,
    items: list[DeliveryItem],
    now: float,
) -> None:
    """Plan what the destination did not take into a delivery to its alternate."""
    unique = list({item.sop_instance_uid: item for item in items}.values())
    delivery_id = store.plan_delivery(
        delivery.study_uid, alternate, delivery.calling_ae, unique, now
    )
    log.warning(
        "export.handed_over",
        delivery_id=delivery.delivery_id,
        to_delivery_id=delivery_id,
        destination=delivery.destination.ae_title,
        alternate=alternate.ae_title,
        objects=len(unique),
    )


def _object_state(outcome: OutcomeClass) -> ResultState | None:
    """An object's state after an answer; None: it stays pending (transient)."""
    if outcome is OutcomeClass.TRANSIENT:
        return None
    return ResultState.DELIVERED if outcome.stored else ResultState.DEAD


def _log(
    delivery: DeliveryRow,
    *,
    changed: list[DeliveryItem],
    state: DeliveryState,
    outcome_class: OutcomeClass,
    reason: str | None,
    delay: float,
    duration_s: float,
    attempt: AttemptOutcome,
) -> None:
    common = {
        "destination": delivery.destination.ae_title,
        "calling_ae": delivery.calling_ae,
        "attempt": delivery.attempts,
    }
    sent = [c for c in changed if c.state is ResultState.DELIVERED]
    if sent:
        warnings = {
            o.sop_instance_uid: o.reason
            for o in attempt.objects
            if o.outcome is OutcomeClass.WARNING
        }
        log.info(
            "export.sent",
            kinds=[c.kind.value for c in sent],
            priority="urgent" if any(c.priority == "urgent" for c in sent) else "normal",
            sop_instance_uids=[c.sop_instance_uid for c in sent],
            warnings=list(warnings.values()),
            duration_s=round(duration_s, 3),
            **common,
        )
    for item in changed:
        if item.state is ResultState.DEAD:
            log.error(
                "export.object.dead_letter",
                kind=item.kind.value,
                sop_instance_uid=item.sop_instance_uid,
                status=None if item.status is None else f"0x{item.status:04X}",
                reason=item.reason,
                **common,
            )
    if state is DeliveryState.RETRY_WAIT:
        log.warning(
            "export.retrying",
            outcome=outcome_class.value,
            reason=reason,
            retry_in_s=round(delay, 1),
            **common,
        )
    elif state is DeliveryState.DEAD:
        log.error("export.dead_letter", outcome=outcome_class.value, reason=reason, **common)
    else:
        log.info("export.delivered", outcome=outcome_class.value, **common)
