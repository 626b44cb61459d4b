"""The durable spool: received instances as files, named by generated ids.

A file is written under ``tmp/`` by the listener as the dataset arrives
(``incoming``), fsynced, renamed into ``instances/`` and the directory fsynced, so a file under
``instances/`` is always whole. Nothing in a file name comes from DICOM data.
"""

from __future__ import annotations

import errno
import os
import uuid
from pathlib import Path

from infergate.durable import fsync_dir
from infergate.errors import SpoolError, SpoolFullError


class Spool:
    """Writes instances durably and hands back their paths.

    Each listener process writes into a ``tmp/`` folder of its own (``tmp_name``), so
    one that restarts after a crash removes what it left there without touching the
    files its siblings are receiving.
    """

    def __init__(self, root: Path, tmp_name: str | None = None) -> None:
        self.root = root.resolve()
        self.tmp_dir = self.root / "tmp" if tmp_name is None else self.root / "tmp" / tmp_name
        self.instances_dir = self.root / "instances"
        for folder in (self.root, self.tmp_dir, self.instances_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def clean_orphans(self) -> int:
        """Remove partial files a dead process left under ``tmp_dir``; returns how many."""
        removed = 0
        for leftover in self.tmp_dir.rglob("*"):
            if not leftover.is_dir():
                leftover.unlink(missing_ok=True)
                removed += 1
        return removed

    def adopt(self, partial: Path) -> Path:
        """Make a file written under ``tmp/`` durable and move it into ``instances/``.

        The file is fsynced, renamed to a generated name and the directory fsynced;
        on failure it is removed, so nothing half-written becomes visible.
        """
        self.sync(partial)
        return self.place([partial])[0]

    def sync(self, partial: Path) -> None:
        """Write a file under ``tmp/`` through to the disk; on failure it is removed."""
        if partial.parent != self.tmp_dir:
            raise SpoolError(f"refusing to adopt {partial}: not in {self.tmp_dir}")
        try:
            fd = os.open(partial, os.O_RDONLY)
            try:
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise self._error(exc) from exc

    def place(self, synced: list[Path]) -> list[Path]:
        """Move files that ``sync`` wrote through into ``instances/`` under generated
        names, with one fsync of the folder for all of them; on failure none of them
        stays, under either name."""
        for partial in synced:
            if partial.parent != self.tmp_dir:
                raise SpoolError(f"refusing to adopt {partial}: not in {self.tmp_dir}")
        finals = [self.instances_dir / f"{uuid.uuid4().hex}.dcm" for _ in synced]
        try:
            for partial, final in zip(synced, finals, strict=True):
                os.rename(partial, final)
            fsync_dir(self.instances_dir)
        except OSError as exc:
            self.remove(synced + finals)
            raise self._error(exc) from exc
        return finals

    @staticmethod
    def remove(paths: list[Path]) -> None:
        """Remove files of the spool that must not stay (missing ones are fine)."""
        for path in paths:
            path.unlink(missing_ok=True)

    def _error(self, exc: OSError) -> SpoolError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return SpoolFullError(f"spool {self.root} is full: {exc.strerror}")
        return SpoolError(f"cannot write to spool {self.root}: {exc.strerror}")

    def discard(self, path: Path) -> None:
        """Remove a spooled file that turned out not to be needed (a duplicate)."""
        if path.parent != self.instances_dir:
            raise SpoolError(f"refusing to remove {path}: not a spool file")
        path.unlink(missing_ok=True)
