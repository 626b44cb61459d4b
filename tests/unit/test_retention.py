"""Retention removes what was delivered and keeps what was not, on a real file system
(a small tmpfs for the high-water mark), with real files and the real store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import structlog

from infergate.codes import HEMORRHAGE, PRESENT
from infergate.config import Settings
from infergate.ops.retention import run_retention, sweep_orphans, used_percent
from infergate.store import (
    AssociationAudit,
    CriticalFinding,
    DeliveryItem,
    InstanceRecord,
    NewJob,
    ResultRow,
    Store,
)
from infergate.work.states import (
    DeliveryState,
    JobKind,
    NotificationState,
    ResultKind,
    ResultState,
)

_DAY = 86400.0
_MIB = 2**20


def _study(
    store: Store,
    var: Path,
    name: str,
    *,
    at: float,
    delivered: bool | None,
    size: int = 4096,
    notified: bool | None = None,
) -> list[Path]:
    """A study of one series of two instances and one job with an SR, ``at`` seconds
    since the epoch; its delivery delivered (True), still waiting (False), or none
    (None: no destination, the SR kept); with ``notified``, a critical finding told to
    a receiver (True) or still on its way (False). Returns its files."""
    spool = var / "spool" / "instances"
    spool.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(2):
        path = spool / f"{name}-{index}.dcm"
        path.write_bytes(b"\0" * size)
        paths.append(path)
        store.record_instance(
            InstanceRecord(
                f"{name}.{index}", "1.2", f"series-{name}", f"study-{name}", "CT", path,
                size, "a", "SCANNER", "INFERGATE", f"{name}.{index}",
            ),
            now=at,
        )  # fmt: skip
    (series,) = [s for s in store.receiving_series() if s.series_uid == f"series-{name}"]
    store.complete_series(series, [NewJob(f"job-{name}", JobKind.INFERENCE, "p")], now=at)
    store.start_job(f"job-{name}", at)
    sr = var / "results" / f"job-{name}" / "sr.dcm"
    sr.parent.mkdir(parents=True)
    sr.write_bytes(b"\0" * 100)
    result = ResultRow(f"sr-{name}", f"job-{name}", ResultKind.SR, sr)
    finding = CriticalFinding(HEMORRHAGE, PRESENT, None, "p", "1", "P", result.sop_instance_uid)
    critical = () if notified is None else (finding,)
    store.finish_job(f"job-{name}", [result], at, critical=critical, receivers=("pager",))
    if notified:
        (notification,) = [n for n in store.due_notifications(at) if n.job_id == f"job-{name}"]
        assert store.claim_notification(notification.notification_id, at)
        store.record_notification(
            notification.notification_id, NotificationState.DELIVERED, None, at, at
        )
    if delivered is None:
        store.keep_results([result.sop_instance_uid], "no destination", at)
        return [*paths, sr]
    settings = Settings.model_validate(
        {"export": {"destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}}}
    )
    destination = settings.export.destination
    assert destination is not None
    delivery_id = store.plan_delivery(f"study-{name}", destination, "INFERGATE", [result], at)
    if delivered:
        store.claim_delivery(delivery_id, at)
        item = DeliveryItem(
            result.sop_instance_uid, ResultKind.SR, sr, "normal", ResultState.DELIVERED
        )
        store.record_attempt(
            delivery_id, [item], state=DeliveryState.DELIVERED, outcome="delivered",
            reason=None, next_attempt_at=at, now=at,
        )  # fmt: skip
    return [*paths, sr]


def _settings(var: Path, **retention: float) -> Settings:
    return Settings.model_validate({"storage": {"var_dir": str(var)}, "retention": retention})


def test_delivered_studies_go_after_keep_days_and_nothing_else_does(
    database: Path | str, tmp_path: Path
) -> None:
    var = tmp_path / "var"
    store = Store(database)
    now = time.time()
    old_delivered = _study(store, var, "old", at=now - 8 * _DAY, delivered=True)
    old_kept = _study(store, var, "kept", at=now - 8 * _DAY, delivered=None)
    old_waiting = _study(store, var, "waiting", at=now - 8 * _DAY, delivered=False)
    recent = _study(store, var, "recent", at=now - 1 * _DAY, delivered=True)
    with structlog.testing.capture_logs() as logs:
        summary = run_retention(store, _settings(var, keep_days=7), now=now)
    assert (summary.studies, summary.files) == (2, 6)
    removed = {e["study_uid"] for e in logs if e["event"] == "retention.study.removed"}
    assert removed == {"study-old", "study-kept"}
    assert not any(p.exists() for p in old_delivered + old_kept)
    assert not (var / "results" / "job-old").exists()  # the emptied results folder too
    assert all(p.exists() for p in old_waiting + recent)
    # Their rows went with them; the others are whole.
    assert {j.job_id for j in store.jobs()} == {"job-waiting", "job-recent"}
    assert {s.study_uid for s in store.finished_studies()} == {"study-recent"}


def test_a_critical_finding_not_yet_told_keeps_its_study_and_one_told_goes_with_it(
    database: Path | str,
    tmp_path: Path,
) -> None:
    var = tmp_path / "var"
    store = Store(database)
    now = time.time()
    told = _study(store, var, "told", at=now - 8 * _DAY, delivered=True, notified=True)
    untold = _study(store, var, "untold", at=now - 8 * _DAY, delivered=True, notified=False)
    summary = run_retention(store, _settings(var, keep_days=7), now=now)
    assert summary.studies == 1
    assert not any(p.exists() for p in told)
    assert all(p.exists() for p in untold)  # its notification reads the SR still
    assert [n.job_id for n in store.notifications()] == ["job-untold"]


def test_a_study_that_receives_again_is_not_finished(database: Path | str, tmp_path: Path) -> None:
    var = tmp_path / "var"
    store = Store(database)
    now = time.time()
    _study(store, var, "old", at=now - 8 * _DAY, delivered=True)
    late = var / "late.dcm"
    late.write_bytes(b"\0")
    store.record_instance(
        InstanceRecord(
            "late", "1.2", "series-old", "study-old", "CT", late, 1, "b", "SCANNER",
            "INFERGATE", "late",
        ),
        now=now,
    )  # fmt: skip
    assert run_retention(store, _settings(var, keep_days=7), now=now).studies == 0
    assert late.exists()


def test_over_the_high_water_mark_the_oldest_finished_go_first_and_undelivered_stay(
    database: Path | str,
    small_filesystem: Path,
) -> None:
    """A 48 MiB file system, 36 MiB of it in studies: over a 50% mark, finished studies
    go oldest first, even before keep_days, until under the 40% low mark; the study
    whose results are not delivered stays whatever the pressure."""
    var = small_filesystem / "var"
    store = Store(database)
    now = time.time()
    size = 3 * _MIB  # two instances each: 6 MiB a study
    waiting = _study(store, var, "waiting", at=now - 5 * _DAY, delivered=False, size=size)
    oldest = _study(store, var, "a", at=now - 4 * _DAY, delivered=True, size=size)
    older = _study(store, var, "b", at=now - 3 * _DAY, delivered=True, size=size)
    kept = [
        _study(store, var, name, at=now - days * _DAY, delivered=True, size=size)
        for name, days in (("c", 2), ("d", 1), ("e", 0.5))
    ]
    assert used_percent(var) > 50
    settings = _settings(var, keep_days=7, high_water_percent=50, low_water_percent=40)
    with structlog.testing.capture_logs() as logs:
        run_retention(store, settings, now=now)
    removed = [e["study_uid"] for e in logs if e["event"] == "retention.study.removed"]
    assert removed[:2] == ["study-a", "study-b"]  # oldest first
    assert "study-waiting" not in removed
    assert used_percent(var) < 40
    assert all(p.exists() for p in waiting)
    assert not any(p.exists() for p in oldest + older)
    assert all(e["reason"] == "spool over its high-water mark" for e in logs if "reason" in e)
    assert any(p.exists() for study in kept for p in study)  # it stopped under the mark


def test_the_audit_trail_is_pruned_after_audit_keep_days(
    database: Path | str, tmp_path: Path
) -> None:
    store = Store(database)
    now = time.time()
    for name, ended in (("old", now - 100 * _DAY), ("new", now - _DAY)):
        audit = AssociationAudit(name, "127.0.0.1", 1, "A", "B", False, "released", None, ended)
        store.record_association(audit, ended)
    assert run_retention(store, _settings(tmp_path, audit_keep_days=90), now=now).associations == 1


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def test_files_no_row_names_are_swept_once_old_enough(database: Path | str, tmp_path: Path) -> None:
    """What a crash between a study's rows and its files leaves: instances and result
    files that no row names. Old ones go; new ones (their row may be on its way) and
    named ones stay."""
    var = tmp_path / "var"
    store = Store(database)
    named = _study(store, var, "named", at=time.time(), delivered=False)
    old_orphan = var / "spool" / "instances" / "gone.dcm"
    new_orphan = var / "spool" / "instances" / "arriving.dcm"
    old_result = var / "results" / "job-gone" / "seg.dcm"
    old_result.parent.mkdir(parents=True)
    for path in (old_orphan, new_orphan, old_result):
        path.write_bytes(b"\0" * 10)
    for path in (*named, old_orphan, old_result):
        _age(path, 2 * 3600)
    with structlog.testing.capture_logs() as logs:
        swept = sweep_orphans(store, _settings(var, orphan_age_s=3600))
    assert (swept.files, swept.bytes) == (2, 20)
    assert not old_orphan.exists()
    assert not old_result.parent.exists()  # its emptied job folder too
    assert new_orphan.exists()
    assert all(p.exists() for p in named)
    (event,) = [e for e in logs if e["event"] == "retention.orphans.removed"]
    assert event["files"] == 2


def test_no_sweep_when_rows_name_files_elsewhere(database: Path | str, tmp_path: Path) -> None:
    """A var folder moved (rows name the old place): every file would look unnamed,
    so nothing is swept."""
    old, moved = tmp_path / "old", tmp_path / "moved"
    store = Store(database)
    files = _study(store, old, "moved", at=time.time(), delivered=True)
    for path in files:
        target = moved / path.relative_to(old)
        target.parent.mkdir(parents=True, exist_ok=True)
        path.rename(target)
        _age(target, 2 * 3600)
    with structlog.testing.capture_logs() as logs:
        swept = sweep_orphans(store, _settings(moved, orphan_age_s=3600))
    assert swept.files == 0
    assert all((moved / p.relative_to(old)).exists() for p in files)
    assert [e["event"] for e in logs] == ["retention.orphans.skipped"]
