"""The durable spool: received instances as files, named by generated ids.

A file is written under ``tmp/``, fsynced, renamed into ``instances/`` and the
directory fsynced, so a file under ``instances/`` is always whole. Nothing in a
file name comes from DICOM data.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from infergate.errors import SpoolError, SpoolFullError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Writes instances durably and hands back their paths."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.instances_dir = root / "instances"
        for folder in (self.root, self.tmp_dir, self.instances_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def clean_orphans(self) -> int:
        """Remove partial files a dead process left in ``tmp/``; returns how many."""
        removed = 0
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

    def write(self, data: bytes) -> Path:
        """Store ``data`` durably and return its final path."""
        name = f"{uuid.uuid4().hex}.dcm"
        partial = self.tmp_dir / name
        final = self.instances_dir / name
        try:
            with partial.open("xb") as out:
                out.write(data)
                out.flush()
                os.fdatasync(out.fileno())
            os.rename(partial, final)
            fsync_dir(self.instances_dir)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            if exc.errno in (28, 122):  # ENOSPC, EDQUOT
                raise SpoolFullError(f"spool {self.root} is full: {exc.strerror}") from exc
            raise SpoolError(f"cannot write to spool {self.root}: {exc.strerror}") from exc
        return final

    def discard(self, path: Path) -> None:
        """Remove a spooled file that turned out not to be needed (a duplicate)."""
        if path.parent != self.instances_dir:
            raise SpoolError(f"refusing to remove {path}: not a spool file")
        path.unlink(missing_ok=True)
