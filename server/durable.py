"""Durable files, for every stage that writes one (the spool, results): a rename is
only durable once the folder holding it is synced too."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Sync the folder ``path``, so that what was created or renamed in it survives a
    crash of the machine."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
