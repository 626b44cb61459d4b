"""Retention: finished studies are removed ``retention.keep_days`` after they finished,
and sooner, oldest first, while the spool's file system is over its high-water mark.

Nothing still to be processed or delivered is ever removed (``store.retention`` says
what finished means). Rows go first, in one transaction, then the files: a crash in
between leaves files that no row names, never a row whose file is gone. Every removal
is logged (``retention.study.removed``) and counted in the pass's summary.
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
