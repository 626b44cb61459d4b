"""Shared memory regions left by an Infergate process that died are removed; those of a
running one are not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from infergate.inference.shared_memory import remove_stale_regions


def test_only_the_regions_of_dead_processes_are_removed(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(dead.stdout)
    stale = tmp_path / f"infergate_{dead_pid}_3"
    live = tmp_path / f"infergate_{os.getpid()}_1"
    other = tmp_path / "someone_elses_region"
    for path in (stale, live, other):
        path.write_bytes(b"x")
    assert remove_stale_regions(tmp_path) == [stale.name]
    assert not stale.exists()
    assert live.exists()
    assert other.exists()
