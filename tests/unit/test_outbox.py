"""The outbox: deliveries per study and destination, the class of each outcome, and
what each class does, against real C-STORE SCPs (pynetdicom's) on loopback ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog
from pydicom.uid import (
    Comprehensive3DSRStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import C_STORE

from infergate.config import DeviceSettings, Settings
from infergate.errors import NotFoundError, RefusedError
from infergate.export.outbox import deliver, plan
from infergate.export.outcomes import OutcomeClass, classify_status
from infergate.export.worker import ExportWorker
from infergate.inference.volume import load_series
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode, write_result
from infergate.store import AssociationAudit, InstanceRecord, NewJob, ResultRow, Store
from infergate.testing import ChestPhantom
from infergate.work.states import (
    DeliveryState,
    JobKind,
    JobState,
    Priority,
    ResultKind,
    ResultState,
)
from infergate_plugins.ct_lung import plugin as ct_lung
from peers import free_port, wait_until

_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@dataclass
class Pacs:
    """A pynetdicom Storage SCP that answers each C-STORE with ``answer(n)``."""

    port: int = field(default_factory=free_port)
    received: list[tuple[str, int]] = field(default_factory=list)
    answer: Callable[[int], int] = lambda _n: 0x0000
    sop_classes: tuple[str, ...] = (str(CTImageStorage),)
    ae_title: str = "PACS"
    abort_at: int | None = None  # abort the association at this C-STORE (1-based)
    server: Any = None

    def start(self) -> None:
        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True
        for sop_class in self.sop_classes:
            ae.add_supported_context(sop_class, _SYNTAXES)
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )

    def _on_store(self, event: evt.Event) -> int:
        count = len(self.received) + 1
        if self.abort_at == count:
            self.abort_at = None
            event.assoc.abort()
            return 0xC000
        request = event.request
        assert isinstance(request, C_STORE)
        self.received.append((str(event.dataset.SOPInstanceUID), int(request.Priority)))
        return self.answer(count)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def settings(self, **export: Any) -> Settings:
        destination = {"ae_title": self.ae_title, "host": "127.0.0.1", "port": self.port}
        return Settings.model_validate(
            {"export": {"destination": destination, "retry_delay_s": 0, **export}}
        )


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    peer = Pacs()
    peer.start()
    yield peer
    peer.stop()


def _job_with_results(
    store: Store,
    job_id: str,
    results: list[tuple[ResultKind, Path]],
    *,
    priority: Priority = "normal",
    study_uid: str = "st1",
    called_ae: str = "INFERGATE",
    calling_ae: str = "SCANNER",
    now: float = 1.0,
) -> list[str]:
    """A done job of a study whose results are ``results``; returns their UIDs."""
    series_uid = f"series-{job_id}"
    store.record_instance(
        InstanceRecord(
            f"{series_uid}.1",
            str(CTImageStorage),
            series_uid,
            study_uid,
            "CT",
            Path("/spool/x.dcm"),
            1,
            "a",
            calling_ae,
            called_ae,
            series_uid,
        ),
        now=now,
    )
    (series,) = [s for s in store.receiving_series() if s.series_uid == series_uid]
    assert store.complete_series(series, [NewJob(job_id, JobKind.INFERENCE, "p")], now=now)
    store.start_job(job_id, now)
    rows = [
        ResultRow(
            str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID),
            job_id,
            kind,
            path,
            priority,
        )
        for kind, path in results
    ]
    assert store.finish_job(job_id, rows, now)
    return [r.sop_instance_uid for r in rows]


def _send_all(store: Store, settings: Settings) -> list[DeliveryState]:
    """Plan, then attempt every due delivery once, in this thread."""
    plan(store, settings, time.time())
    states = []
    for delivery in store.due_deliveries(now=1e12):  # due or not: the next attempt now
        assert store.claim_delivery(delivery.delivery_id, time.time(), settings.node.name)
        states.append(deliver(store, settings, store.delivery(delivery.delivery_id)))
    return states


def _items(store: Store) -> dict[str, tuple[ResultState, int | None, str | None]]:
    return {
        item.sop_instance_uid: (item.state, item.status, item.reason)
        for d in store.deliveries()
        for item in store.delivery_items(d.delivery_id)
    }


def test_statuses_fall_into_their_classes() -> None:
    assert classify_status(0x0000) is OutcomeClass.DELIVERED
    for warning in (0xB000, 0xB006, 0xB007):
        assert classify_status(warning) is OutcomeClass.WARNING
    for transient in (0xA700, 0xA7FF, 0x0110, 0x0213):
        assert classify_status(transient) is OutcomeClass.TRANSIENT
    for permanent in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0122):
        assert classify_status(permanent) is OutcomeClass.PERMANENT


def test_without_a_destination_results_stay_on_disk_and_the_log_says_so(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    path = small_phantom.paths[0]
    (uid,) = _job_with_results(store, "job1", [(ResultKind.SR, path)])
    with structlog.testing.capture_logs() as logs:
        plan(store, Settings(), 2.0)
    (skipped,) = [e for e in logs if e["event"] == "export.skipped"]
    assert skipped["paths"] == [str(path)]
    assert store.unplanned_results() == []
    assert store.deliveries() == []
    assert store.result_states() == {uid: ResultState.KEPT}


def test_one_delivery_per_study_and_destination_takes_everything_ready(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    first = _job_with_results(store, "a", [(ResultKind.SEG, small_phantom.paths[0])])
    second = _job_with_results(store, "b", [(ResultKind.SR, small_phantom.paths[1])])
    other = _job_with_results(
        store, "c", [(ResultKind.SR, small_phantom.paths[2])], study_uid="st2"
    )
    settings = pacs.settings()
    plan(store, settings, 2.0)
    deliveries = store.deliveries()
    assert sorted(len(store.delivery_items(d.delivery_id)) for d in deliveries) == [1, 2]
    assert _send_all(store, settings) == [DeliveryState.DELIVERED, DeliveryState.DELIVERED]
    assert sorted(uid for uid, _ in pacs.received) == sorted(first + second + other)


def test_urgent_results_go_first_with_c_store_priority_high(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    _job_with_results(store, "normal", [(ResultKind.SEG, small_phantom.paths[0])], now=1.0)
    _job_with_results(
        store,
        "urgent",
        [(ResultKind.SEG, small_phantom.paths[1])],
        priority="urgent",
        study_uid="st2",
        now=2.0,
    )
    with structlog.testing.capture_logs() as logs:
        _send_all(store, pacs.settings())
    sent = [(e["sop_instance_uids"][0], e["priority"]) for e in logs if e["event"] == "export.sent"]
    assert [priority for _, priority in sent] == ["urgent", "normal"]
    # What the PACS saw: the urgent one first, as HIGH (1); the other MEDIUM (0).
    assert [priority for _, priority in pacs.received] == [1, 0]
    assert [uid for uid, _ in pacs.received] == [uid for uid, _ in sent]


def _as_segmentation(source: Path, target: Path) -> Path:
    """A copy of ``source`` under the Segmentation Storage SOP class and a new UID: a
    PACS configured without Segmentation refuses its presentation context."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(target)
    return target


def test_a_sop_class_the_destination_does_not_accept_is_that_objects_dead_letter(
    database: Path | str,
    tmp_path: Path,
    small_phantom: ChestPhantom,
    pacs: Pacs,
    chest_phantom: ChestPhantom,
) -> None:
    """The PACS takes CT but not Segmentation: the CT object goes, the SEG is refused
    for good with the reason, and nothing raises."""
    seg = _as_segmentation(small_phantom.paths[1], tmp_path / "seg.dcm")
    store = Store(database)
    ct_uid, seg_uid = _job_with_results(
        store, "job", [(ResultKind.SR, small_phantom.paths[0]), (ResultKind.SEG, seg)]
    )
    with structlog.testing.capture_logs() as logs:
        assert _send_all(store, pacs.settings()) == [DeliveryState.DEAD]
    assert [uid for uid, _ in pacs.received] == [ct_uid]
    items = _items(store)
    assert items[ct_uid][0] is ResultState.DELIVERED
    state, status, reason = items[seg_uid]
    assert (state, status) == (ResultState.DEAD, None)
    assert reason is not None
    assert "did not accept Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4)" in reason
    (dead,) = [e for e in logs if e["event"] == "export.object.dead_letter"]
    assert dead["sop_instance_uid"] == seg_uid


def test_a_transient_status_is_retried_and_a_permanent_one_is_a_dead_letter(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    retried, refused = _job_with_results(
        store,
        "job",
        [(ResultKind.SEG, small_phantom.paths[0]), (ResultKind.SR, small_phantom.paths[1])],
    )
    answers = {1: 0xA700, 2: 0xC000, 3: 0x0000}  # out of resources, cannot understand, ok
    pacs.answer = lambda n: answers[n]
    settings = pacs.settings()
    with structlog.testing.capture_logs() as logs:
        assert _send_all(store, settings) == [DeliveryState.RETRY_WAIT]
    (retrying,) = [e for e in logs if e["event"] == "export.retrying"]
    assert retrying["outcome"] == "transient"
    assert "0xA700 (Refused: Out of Resources)" in retrying["reason"]
    items = _items(store)
    assert items[refused][:2] == (ResultState.DEAD, 0xC000)
    assert items[retried][0] is ResultState.PENDING
    # The next attempt sends only what is still pending, under the same UID.
    assert _send_all(store, settings) == [DeliveryState.DEAD]  # one object stays dead
    assert [uid for uid, _ in pacs.received] == [retried, refused, retried]
    assert _items(store)[retried][:2] == (ResultState.DELIVERED, 0x0000)


def test_a_warning_counts_as_delivered_and_is_recorded(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    (uid,) = _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    pacs.answer = lambda _n: 0xB000
    assert _send_all(store, pacs.settings()) == [DeliveryState.DELIVERED]
    assert _items(store)[uid][:2] == (ResultState.DELIVERED, 0xB000)
    (delivery,) = store.deliveries()
    assert delivery.outcome == "warning"


def test_a_permanent_association_reject_is_a_dead_letter_at_once(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    settings = Settings.model_validate(
        {"export": {"destination": {"ae_title": "WRONG", "host": "127.0.0.1", "port": pacs.port}}}
    )
    with structlog.testing.capture_logs() as logs:
        assert _send_all(store, settings) == [DeliveryState.DEAD]
    (dead,) = [e for e in logs if e["event"] == "export.dead_letter"]
    assert dead["outcome"] == "permanent"
    assert "Rejected Permanent" in dead["reason"]
    assert "Called AE title not recognised" in dead["reason"]
    assert pacs.received == []


def test_a_destination_down_waits_with_backoff_then_dead_letters_past_the_horizon(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    down = Pacs()  # never started: nothing listens
    settings = down.settings(timeout_s=2, retry_delay_s=10, max_retry_delay_s=15)
    with structlog.testing.capture_logs() as logs:
        assert _send_all(store, settings) == [DeliveryState.RETRY_WAIT]
        (delivery,) = store.deliveries()
        # Not due before its time: it survives a restart in the store, not in memory.
        assert store.due_deliveries(now=delivery.next_attempt_at - 1) == []
        assert _send_all(store, settings) == [DeliveryState.RETRY_WAIT]
    delays = [e["retry_in_s"] for e in logs if e["event"] == "export.retrying"]
    assert delays == [10, 15]  # doubled, capped at max_retry_delay_s
    assert delivery.reason is not None
    assert "gave no A-ASSOCIATE response ([Errno 111] Connection refused)" in delivery.reason
    short = down.settings(timeout_s=2, retry_horizon_s=0.001)
    with structlog.testing.capture_logs() as logs:
        assert _send_all(store, short) == [DeliveryState.DEAD]
    (dead,) = [e for e in logs if e["event"] == "export.dead_letter"]
    assert "(export.retry_horizon_s)" in dead["reason"]


def test_an_abort_mid_send_resends_only_what_was_not_acknowledged(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    uids = _job_with_results(
        store, "job", [(ResultKind.FORWARDED, p) for p in small_phantom.paths[:3]]
    )
    pacs.abort_at = 2
    settings = pacs.settings()
    assert _send_all(store, settings) == [DeliveryState.RETRY_WAIT]
    assert _send_all(store, settings) == [DeliveryState.DELIVERED]
    # Each UID stored exactly once: the first before the abort, the rest after.
    assert sorted(uid for uid, _ in pacs.received) == sorted(uids)


def test_a_silent_destination_delays_only_its_own_deliveries(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    """One PACS accepts the connection and never answers; the other's results arrive
    while the first association is still waiting."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # connections complete in the backlog; nothing ever reads them
    store = Store(database)
    _job_with_results(store, "stuck", [(ResultKind.SR, small_phantom.paths[0])], called_ae="SILENT")
    (uid,) = _job_with_results(store, "fine", [(ResultKind.SR, small_phantom.paths[1])])
    destination = {"ae_title": "SILENT", "host": "127.0.0.1", "port": silent.getsockname()[1]}
    settings = Settings.model_validate(
        {
            "ingest": {"called_aes": [{"ae_title": "SILENT", "destination": destination}]},
            "export": {
                "destination": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
                "timeout_s": 30,
            },
        }
    )
    worker = ExportWorker(settings, store)

    def delivered() -> bool:
        worker.step()
        return bool(store.deliveries(DeliveryState.DELIVERED))

    try:
        wait_until(delivered, 20, "the other destination's delivery")
        assert [u for u, _ in pacs.received] == [uid]
        states = {d.destination.ae_title: d.state for d in store.deliveries()}
        assert states == {"SILENT": DeliveryState.SENDING, "PACS": DeliveryState.DELIVERED}
    finally:
        worker.shutdown(wait_s=0)
        silent.close()


def _with_alternate(primary: Pacs, alternate: Pacs, after: int = 3) -> Settings:
    def where(pacs: Pacs) -> dict[str, Any]:
        return {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port}

    destination = {**where(primary), "alternate": where(alternate)}
    destination["alternate_after_transient"] = after
    return Settings.model_validate(
        {"export": {"destination": destination, "retry_delay_s": 0, "timeout_s": 5}}
    )


def test_what_the_destination_refuses_for_good_goes_to_its_alternate(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    archive = Pacs(sop_classes=(str(CTImageStorage), str(SegmentationStorage)), ae_title="ARCHIVE")
    archive.start()
    try:
        seg = _as_segmentation(small_phantom.paths[1], tmp_path / "seg.dcm")
        store = Store(database)
        ct_uid, seg_uid = _job_with_results(
            store, "job", [(ResultKind.SR, small_phantom.paths[0]), (ResultKind.SEG, seg)]
        )
        settings = _with_alternate(pacs, archive)
        with structlog.testing.capture_logs() as logs:
            assert _send_all(store, settings) == [DeliveryState.DEAD]  # the primary's
            assert _send_all(store, settings) == [DeliveryState.DELIVERED]  # the archive's
    finally:
        archive.stop()
    assert [uid for uid, _ in pacs.received] == [ct_uid]
    assert [uid for uid, _ in archive.received] == [seg_uid]
    (handed,) = [e for e in logs if e["event"] == "export.handed_over"]
    assert (handed["destination"], handed["alternate"], handed["objects"]) == ("PACS", "ARCHIVE", 1)
    assert store.result_states() == {ct_uid: ResultState.DELIVERED, seg_uid: ResultState.DELIVERED}


def test_a_destination_down_hands_over_after_its_transient_failures(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    down = Pacs(ae_title="DOWN")  # never started
    store = Store(database)
    (uid,) = _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    settings = _with_alternate(down, pacs, after=2)
    assert _send_all(store, settings) == [DeliveryState.RETRY_WAIT]
    assert _send_all(store, settings) == [DeliveryState.DEAD]  # the second: handed over
    assert _send_all(store, settings) == [DeliveryState.DELIVERED]
    assert [u for u, _ in pacs.received] == [uid]
    dead = store.deliveries(DeliveryState.DEAD)[0]
    assert dead.reason is not None
    assert dead.reason.startswith("handed over to the alternate destination PACS after:")


def test_results_return_to_the_sender_at_the_address_it_came_from(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    """A PACS that sends a study gets its results back: its calling AE title, the
    address its association came from, the port of its peer entry."""
    store = Store(database)
    store.record_association(
        AssociationAudit(
            "a", "127.0.0.1", 50000, "PACS", "INFERGATE", False, "released", None, 1.0
        ),
        ended_at=2.0,
    )
    (uid,) = _job_with_results(
        store, "job", [(ResultKind.SR, small_phantom.paths[0])], calling_ae="PACS"
    )
    fallback = Pacs(ae_title="FALLBACK")  # never started: it must not be the one used
    settings = Settings.model_validate(
        {
            "ingest": {
                "peers": [{"ae_title": "PACS", "addresses": ["127.0.0.0/8"], "port": pacs.port}]
            },
            "export": {
                "return_to_sender": True,
                "destination": {"ae_title": "FALLBACK", "host": "127.0.0.1", "port": fallback.port},
            },
        }
    )
    assert _send_all(store, settings) == [DeliveryState.DELIVERED]
    assert [u for u, _ in pacs.received] == [uid]
    (delivery,) = store.deliveries()
    assert delivery.destination.key == ("PACS", "127.0.0.1", pacs.port)


def test_a_sender_without_a_port_gets_the_configured_destination(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    settings = pacs.settings(return_to_sender=True)  # the loopback peer has no port
    assert _send_all(store, settings) == [DeliveryState.DELIVERED]
    assert len(pacs.received) == 1


def test_a_replayed_dead_letter_sends_only_what_was_not_delivered_and_only_once(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    """The PACS refused the SEG (not configured for it) and took the SR; the replay to
    a second destination carries the SEG alone, and the dead letter is no longer one."""
    store = Store(database)
    seg = _as_segmentation(small_phantom.paths[0], tmp_path / "seg.dcm")
    seg_uid, sr_uid = _job_with_results(
        store, "job", [(ResultKind.SEG, seg), (ResultKind.SR, small_phantom.paths[1])]
    )
    assert _send_all(store, pacs.settings()) == [DeliveryState.DEAD]
    (dead,) = store.delivery_views(dead_only=True)
    assert store.pipeline_gauges().dead_deliveries == 1
    other = Pacs(sop_classes=(str(CTImageStorage), str(SegmentationStorage)), ae_title="OTHER")
    target = other.settings().export.destination
    assert target is not None
    other.start()
    try:
        replay_id = store.replay_delivery(dead.delivery_id, target, time.time())
        with pytest.raises(RefusedError, match="replayed already"):
            store.replay_delivery(dead.delivery_id, target, time.time())
        assert store.delivery_views(dead_only=True) == []
        assert store.pipeline_gauges().dead_deliveries == 0
        assert store.pipeline_gauges().dead_objects == 0
        assert [i.sop_instance_uid for i in store.delivery_items(replay_id)] == [seg_uid]
        assert store.claim_delivery(replay_id, time.time(), other.settings().node.name)
        replayed = store.delivery(replay_id)
        assert deliver(store, other.settings(), replayed) is DeliveryState.DELIVERED
    finally:
        other.stop()
    assert [uid for uid, _ in other.received] == [seg_uid]
    assert store.result_states() == {seg_uid: ResultState.DELIVERED, sr_uid: ResultState.DELIVERED}
    assert store.delivery_view(dead.delivery_id).replayed_to == replay_id


def test_only_a_dead_letter_is_replayed(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    store = Store(database)
    _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    assert _send_all(store, pacs.settings()) == [DeliveryState.DELIVERED]
    (delivered,) = store.deliveries()
    with pytest.raises(RefusedError, match="is delivered, not a dead letter"):
        store.replay_delivery(delivered.delivery_id, None, 2.0)
    with pytest.raises(NotFoundError):
        store.replay_delivery("no-such-delivery", None, 2.0)


def test_a_done_jobs_kept_results_are_sent_on_request(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom, pacs: Pacs
) -> None:
    """What the selftest does with --destination: results kept on disk (no
    destination) go to the one named."""
    store = Store(database)
    (uid,) = _job_with_results(store, "job", [(ResultKind.SR, small_phantom.paths[0])])
    plan(store, Settings(), time.time())
    assert store.result_states() == {uid: ResultState.KEPT}
    destination = pacs.settings().export.destination
    assert destination is not None
    delivery_id = store.send_job_results("job", destination, "INFERGATE", time.time())
    assert store.claim_delivery(delivery_id, time.time(), pacs.settings().node.name)
    assert deliver(store, pacs.settings(), store.delivery(delivery_id)) is DeliveryState.DELIVERED
    assert [u for u, _ in pacs.received] == [uid]
    with pytest.raises(NotFoundError):
        store.send_job_results("nope", destination, "INFERGATE", 3.0)


def test_an_operator_retries_a_failed_job_but_not_a_done_one_nor_one_without_its_files(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    _job_with_results(store, "done", [(ResultKind.SR, small_phantom.paths[0])])
    with pytest.raises(RefusedError, match="only a failed or dead job is retried"):
        store.retry_failed_job("done", 2.0)
    # "done"'s instance is at /spool/x.dcm, which does not exist: a failed job there
    # cannot run again.
    series = store.job("done").series_uid
    store.record_instance(
        InstanceRecord(
            "late.1", str(CTImageStorage), series, "st1", "CT", small_phantom.paths[1], 1,
            "a", "SCANNER", "INFERGATE", "late",
        ),
        now=3.0,
    )  # fmt: skip
    (reopened,) = store.receiving_series()
    assert store.complete_series(reopened, [NewJob("again", JobKind.INFERENCE, "p")], now=4.0)
    store.start_job("again", 4.0)
    assert store.fail_job("again", "it broke", 5.0)
    with pytest.raises(RefusedError, match="no longer on disk"):
        store.retry_failed_job("again", 6.0)
    with pytest.raises(NotFoundError):
        store.retry_failed_job("nope", 6.0)


def test_a_failed_job_with_its_files_goes_back_in_the_queue_as_new(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    store = Store(database)
    store.record_instance(
        InstanceRecord(
            "i.1", str(CTImageStorage), "se", "st", "CT", small_phantom.paths[0], 1,
            "a", "SCANNER", "INFERGATE", "h",
        ),
        now=1.0,
    )  # fmt: skip
    (series,) = store.receiving_series()
    assert store.complete_series(series, [NewJob("job", JobKind.INFERENCE, "p")], now=2.0)
    store.start_job("job", 3.0)
    assert store.fail_job("job", "Triton refused", 4.0)
    store.retry_failed_job("job", 5.0)
    job = store.job("job")
    assert (job.state, job.attempts, job.error) == (JobState.QUEUED, 0, None)
    assert [j.job_id for j in store.runnable_jobs(now=6.0)] == ["job"]
    (view,) = store.job_views(state=JobState.QUEUED)
    assert view.job_id == "job"
    assert store.job_views(state=JobState.FAILED) == []


def test_a_destination_set_to_secondary_capture_gets_the_seg_drawn_on_its_slices(
    database: Path | str, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    """``segmentation: secondary_capture``: a PACS that could store the SEG gets the
    images instead, each once, and the SEG is recorded as replaced, not dead."""
    store = Store(database)
    for path in small_phantom.paths:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        uid = str(header.SOPInstanceUID)
        record = InstanceRecord(
            uid, str(CTImageStorage), small_phantom.series_uid, small_phantom.study_uid,
            "CT", path, 1, "a", "SCANNER", "INFERGATE", uid,
        )  # fmt: skip
        store.record_instance(record, now=1.0)
    (series,) = store.receiving_series()
    assert store.complete_series(series, [NewJob("job", JobKind.INFERENCE, "ct_lung")], now=1.0)
    store.start_job("job", 1.0)
    loaded = load_series(list(small_phantom.paths))
    labels = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    labels[10:14, 80:180, 40:120] = 1  # a right lung of 4 slices, ~380 mL
    findings = ct_lung.postprocess(loaded.series, {"LUNG_LABELS": labels})
    identity = ResultIdentity("job", "1.2.826.0.1.3680043.8.498.", DeviceSettings(), 9001, 9002)
    written = [
        write_result(tmp_path / "results" / "job", r)
        for r in encode(loaded, findings, ct_lung.spec, identity)
    ]
    rows = [
        ResultRow(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID), "job", kind, p)
        for kind, p in zip((ResultKind.SEG, ResultKind.SR), written, strict=True)
    ]
    assert store.finish_job("job", rows, 1.0)
    pacs = Pacs(
        sop_classes=(
            str(SegmentationStorage),
            str(SecondaryCaptureImageStorage),
            str(Comprehensive3DSRStorage),
        )
    )
    pacs.start()
    try:
        settings = pacs.settings()
        destination = settings.export.destination
        assert destination is not None
        settings = settings.model_copy(
            update={
                "export": settings.export.model_copy(
                    update={
                        "destination": destination.model_copy(
                            update={"segmentation": "secondary_capture"}
                        )
                    }
                )
            }
        )
        with structlog.testing.capture_logs() as logs:
            assert _send_all(store, settings) == [DeliveryState.DELIVERED]
    finally:
        pacs.stop()
    assert not [e for e in logs if e["event"] == "export.captures.failed"], logs
    items = _items(store)
    assert items[rows[0].sop_instance_uid][0] is ResultState.REPLACED
    captures = [
        uid for uid, (state, _, _) in items.items() if uid not in {r.sop_instance_uid for r in rows}
    ]
    assert len(captures) == 4  # slices 10 to 13
    assert sorted(uid for uid, _ in pacs.received) == sorted([rows[1].sop_instance_uid, *captures])
    (replaced,) = [e for e in logs if e["event"] == "export.seg.replaced"]
    assert replaced["images"] == 4
