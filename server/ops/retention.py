"""Retention: finished studies are removed ``retention.keep_days`` after they finished,
and sooner, oldest first, while the spool's file system is over its high-water mark.

Nothing still to be processed or delivered is ever removed (``store.retention`` says
what finished means). Rows go first, in one transaction, then the files: a crash in
between leaves files that no row names, never a row whose file is gone. Every removal
is logged (``retention.study.removed``) and counted in the pass's summary. Files that
no row names are swept apart (:func:`sweep_orphans`), once they are old enough that
their row cannot still be on its way.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from infergate.config import Settings
from infergate.logs import get_logger
from infergate.store import Store

log = get_logger(__name__)
_DAY_S = 86400.0


@dataclass(frozen=True)
class RetentionPass:
    studies: int
    files: int
    bytes: int
    associations: int


def used_percent(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return 100.0 * usage.used / usage.total


def run_retention(store: Store, settings: Settings, now: float | None = None) -> RetentionPass:
    """One pass: remove what is due, then what the high-water mark asks for."""
    at = time.time() if now is None else now
    retention = settings.retention
    where = settings.storage.var_dir
    studies = files = removed_bytes = 0
    emergency = used_percent(where) >= retention.high_water_percent
    for study in store.finished_studies():
        due = at - study.finished_at >= retention.keep_days * _DAY_S
        if not due and not emergency:
            break  # the rest finished later still
        removed = store.remove_study(study.study_uid)
        if removed is None:
            continue  # something arrived for it meanwhile
        count, size = _remove_files(removed.files)
        studies, files, removed_bytes = studies + 1, files + count, removed_bytes + size
        log.info(
            "retention.study.removed",
            study_uid=study.study_uid,
            reason="kept for retention.keep_days" if due else "spool over its high-water mark",
            finished_s_ago=round(at - study.finished_at),
            files=count,
            bytes=size,
            rows=removed.rows,
        )
        if emergency and used_percent(where) < retention.low_water_percent:
            emergency = False
    associations = store.prune_associations(at - retention.audit_keep_days * _DAY_S)
    if emergency:
        log.warning(
            "retention.high_water.unresolved",
            used_percent=round(used_percent(where), 1),
            reason="every finished study is removed; what is left is still to be processed"
            " or delivered",
        )
    summary = RetentionPass(studies, files, removed_bytes, associations)
    if studies or associations:
        log.info(
            "retention.pass",
            studies=studies,
            files=files,
            bytes=removed_bytes,
            associations=associations,
        )
    return summary


def _remove_files(paths: tuple[Path, ...]) -> tuple[int, int]:
    """Unlink ``paths`` and the result folders they leave empty; (count, bytes)."""
    count = size = 0
    for path in paths:
        try:
            size += path.stat().st_size
            path.unlink()
            count += 1
        except FileNotFoundError:
            continue
        if path.parent.name != "instances":
            with contextlib.suppress(OSError):  # not empty: another result is in it
                path.parent.rmdir()  # a job's results folder, once empty
    return count, size


@dataclass(frozen=True)
class OrphanSweep:
    files: int
    bytes: int


def sweep_orphans(store: Store, settings: Settings, now: float | None = None) -> OrphanSweep:
    """Remove the received instances and result files that no row names and that are
    older than ``retention.orphan_age_s``: what a crash between a study's rows going
    and its files going left behind. Files still being written are under ``tmp/``,
    which the spool cleans at start."""
    at = time.time() if now is None else now
    oldest = at - settings.retention.orphan_age_s
    storage = settings.storage
    instances = storage.spool_dir / "instances"
    outside = store.files_outside(instances, storage.results_dir)
    if outside:
        # Every file would look unnamed: sweep nothing rather than everything.
        log.warning(
            "retention.orphans.skipped",
            rows=outside,
            reason="rows name files outside the spool and results folders (was the var"
            " folder moved?)",
        )
        return OrphanSweep(0, 0)
    candidates = [
        path
        for path in (
            *_files(instances, "*.dcm"),
            *_files(storage.results_dir, "*/*"),
        )
        if _modified(path) < oldest
    ]
    named = store.named_files(candidates)
    count, size = _remove_files(tuple(p for p in candidates if p not in named))
    if count:
        log.warning(
            "retention.orphans.removed",
            files=count,
            bytes=size,
            reason="no row names them (the process stopped between a study's rows and its files)",
        )
    return OrphanSweep(count, size)


def _files(folder: Path, pattern: str) -> list[Path]:
    return [p for p in folder.glob(pattern) if p.is_file()] if folder.is_dir() else []


def _modified(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return float("inf")  # gone meanwhile: not a candidate
