"""The export worker: plans results into deliveries and sends the due ones, each on a
thread of its own, at most ``export.max_associations`` at once per destination, so
that a destination that is slow, silent or down delays nothing but its own
deliveries. The threads are daemons: a stop does not wait for a silent PACS."""

from __future__ import annotations

import threading
import time

from infergate.config import Settings
from infergate.errors import InfergateError, unexpected
from infergate.export.outbox import backoff_s, deliver, plan
from infergate.export.outcomes import OutcomeClass
from infergate.logs import get_logger
from infergate.store import DeliveryRow, Store
from infergate.work.states import DeliveryState

log = get_logger(__name__)


class ExportWorker:
    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self._lock = threading.Lock()
        # Deliveries being sent, by destination.
        self._sending: dict[str, set[str]] = {}

    def step(self) -> None:
        """Plan what is new, then start every due delivery its destination has room for."""
        now = time.time()
        plan(self._store, self._settings, now)
        for delivery in self._store.due_deliveries(now):
            key = delivery.destination_key
            with self._lock:
                sending = self._sending.setdefault(key, set())
                if len(sending) >= self._settings.export.max_associations:
                    continue
                if not self._store.claim_delivery(
                    delivery.delivery_id, now, self._settings.node.name
                ):
                    continue
                sending.add(delivery.delivery_id)
            threading.Thread(
                target=self._send,
                args=(delivery.delivery_id, key),
                name=f"export-{key}",
                daemon=True,
            ).start()

    def busy(self) -> bool:
        with self._lock:
            return any(self._sending.values())

    def _send(self, delivery_id: str, key: str) -> None:
        try:
            claimed: DeliveryRow = self._store.delivery(delivery_id)
            deliver(self._store, self._settings, claimed)
        except Exception as exc:  # one delivery's failure must not end export
            reason = f"internal error while sending: {unexpected(exc)}"
            log.error("export.delivery.crashed", delivery_id=delivery_id, reason=reason)
            self._wait_after_crash(delivery_id, reason)
        finally:
            with self._lock:
                self._sending[key].discard(delivery_id)

    def _wait_after_crash(self, delivery_id: str, reason: str) -> None:
        """Put a delivery whose attempt crashed back to wait, as a transient failure
        (if its outcome was recorded before the crash, this changes nothing)."""
        now = time.time()
        try:
            attempts = self._store.delivery(delivery_id).attempts
            self._store.record_attempt(
                delivery_id,
                [],
                state=DeliveryState.RETRY_WAIT,
                outcome=OutcomeClass.TRANSIENT.value,
                reason=reason,
                next_attempt_at=now + backoff_s(self._settings, attempts),
                now=now,
                node=self._settings.node.name,
            )
        except InfergateError as exc:
            # Still `sending`: the next start puts it back (recover), with the same UIDs.
            log.error("export.delivery.unrecorded", delivery_id=delivery_id, reason=str(exc))

    def shutdown(self, wait_s: float) -> None:
        """Let associations in progress finish for up to ``wait_s``; one still open then
        stays `sending` in the store and is sent again at the next start (recover)."""
        deadline = time.monotonic() + wait_s
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.1)
