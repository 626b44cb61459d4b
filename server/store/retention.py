"""Retention in the state store: which studies are finished, and removing one.

A study is finished when nothing of it is still to do: no series receiving, no job
queued or running, no result waiting to be planned, every delivery delivered and
every notification of a critical finding delivered (a dead letter, of either, keeps
its study until an operator replays or resends it). Its finishing time
is the latest of its last instance, its jobs' last change and its deliveries' ends.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from infergate.store.connection import Connection
from infergate.store.db import Database
from infergate.work.states import DeliveryState, JobState, NotificationState, SeriesState

# What keeps a study (:study is its UID): any of these is work still to do.
_UNFINISHED = """
    EXISTS (SELECT 1 FROM series s WHERE s.study_uid = :study AND s.state = :receiving)
    OR EXISTS (SELECT 1 FROM jobs j WHERE j.study_uid = :study AND j.state IN (:queued, :running))
    OR EXISTS (SELECT 1 FROM results r JOIN jobs j ON j.job_id = r.job_id
               WHERE j.study_uid = :study AND r.planned_at IS NULL)
    OR EXISTS (SELECT 1 FROM deliveries d WHERE d.study_uid = :study AND d.state != :delivered
               AND d.replayed_to IS NULL)
    OR EXISTS (SELECT 1 FROM notifications n JOIN jobs j ON j.job_id = n.job_id
               WHERE j.study_uid = :study AND n.state != :notified)
"""
_STATES = {
    "receiving": SeriesState.RECEIVING.value,
    "queued": JobState.QUEUED.value,
    "running": JobState.RUNNING.value,
    "delivered": DeliveryState.DELIVERED.value,
    "notified": NotificationState.DELIVERED.value,
}


@dataclass(frozen=True)
class FinishedStudy:
    study_uid: str
    finished_at: float
    bytes: int  # of its received instances


@dataclass(frozen=True)
class RemovedStudy:
    """The rows of a study are gone; these files are to be removed."""

    files: tuple[Path, ...]
    rows: int


class RetentionRecords(Database):
    def finished_studies(self) -> list[FinishedStudy]:
        """Every finished study, the longest finished first."""
        rows = self._rows("SELECT study_uid, MAX(last_received_at) FROM series GROUP BY study_uid")
        finished = []
        with self._reading() as db:
            for study_uid, last_received in rows:
                parameters = {"study": study_uid, **_STATES}
                if db.execute(f"SELECT {_UNFINISHED}", parameters).fetchone()[0]:
                    continue
                job_at, delivered_at, size = db.execute(
                    "SELECT (SELECT MAX(updated_at) FROM jobs WHERE study_uid = :study),"
                    " (SELECT MAX(finished_at) FROM deliveries WHERE study_uid = :study),"
                    " (SELECT COALESCE(SUM(size), 0) FROM instances WHERE study_uid = :study)",
                    parameters,
                ).fetchone()
                at = max(t for t in (last_received, job_at, delivered_at) if t is not None)
                finished.append(FinishedStudy(study_uid, at, size))
        return sorted(finished, key=lambda s: s.finished_at)

    def remove_study(self, study_uid: str) -> RemovedStudy | None:
        """Delete every row of a study, in one transaction, if it is still finished
        (an instance may have arrived since it was judged); returns the files that
        then belong to nothing, or None when the study is no longer finished."""
        parameters = {"study": study_uid, **_STATES}
        with self._transaction() as db:
            if db.execute(f"SELECT {_UNFINISHED}", parameters).fetchone()[0]:
                return None
            files = [
                Path(row[0])
                for row in db.execute(
                    "SELECT path FROM instances WHERE study_uid = :study UNION"
                    " SELECT r.path FROM results r JOIN jobs j ON j.job_id = r.job_id"
                    " WHERE j.study_uid = :study",
                    parameters,
                )
            ]
            rows = sum(_delete(db, statement, study_uid) for statement in _DELETIONS)
        return RemovedStudy(tuple(files), rows)

    def named_files(self, paths: list[Path]) -> set[Path]:
        """Those of ``paths`` that a row names (an instance's or a result's file)."""
        named: set[Path] = set()
        for start in range(0, len(paths), _CHUNK):
            chunk = [str(p) for p in paths[start : start + _CHUNK]]
            marks = ", ".join("?" * len(chunk))
            rows = self._rows(
                f"SELECT path FROM instances WHERE path IN ({marks})"  # noqa: S608 - marks only
                f" UNION SELECT path FROM results WHERE path IN ({marks})",
                (*chunk, *chunk),
            )
            named.update(Path(row[0]) for row in rows)
        return named

    def files_outside(self, instances_dir: Path, results_dir: Path) -> int:
        """How many rows name a file that is not under these folders (the var folder
        was moved, or renamed)."""
        instances, results = f"{instances_dir}{os.sep}", f"{results_dir}{os.sep}"
        (count,) = self._rows(
            "SELECT (SELECT COUNT(*) FROM instances WHERE substr(path, 1, ?) != ?)"
            " + (SELECT COUNT(*) FROM results WHERE substr(path, 1, ?) != ?)",
            (len(instances), instances, len(results), results),
        )[0:1]
        return int(count[0])

    def prune_associations(self, ended_before: float) -> int:
        """Drop audit rows of associations that ended before ``ended_before``."""
        with self._transaction() as db:
            cur = db.execute(
                "DELETE FROM associations WHERE ended_at IS NOT NULL AND ended_at < ?",
                (ended_before,),
            )
            return cur.rowcount


# Paths per query in named_files (SQLite allows 32766 parameters; two lists of these).
_CHUNK = 500

# Children before parents.
_DELETIONS = (
    "DELETE FROM notifications WHERE job_id IN (SELECT job_id FROM jobs WHERE study_uid = ?)",
    "DELETE FROM delivery_items WHERE delivery_id IN"
    " (SELECT delivery_id FROM deliveries WHERE study_uid = ?)",
    "DELETE FROM deliveries WHERE study_uid = ?",
    "DELETE FROM results WHERE job_id IN (SELECT job_id FROM jobs WHERE study_uid = ?)",
    "DELETE FROM jobs WHERE study_uid = ?",
    "DELETE FROM instances WHERE study_uid = ?",
    "DELETE FROM series WHERE study_uid = ?",
)


def _delete(db: Connection, statement: str, study_uid: str) -> int:
    return db.execute(statement, (study_uid,)).rowcount
