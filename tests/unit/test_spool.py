from __future__ import annotations

import re
from pathlib import Path

import pytest

from infergate.errors import SpoolError
from infergate.ingest.spool import Spool


def _received(spool: Spool, data: bytes) -> Path:
    """What pynetdicom leaves in tmp/ for an arriving dataset, adopted as ingest does."""
    partial = spool.tmp_dir / "tmp1a2b3c.dcm"
    partial.write_bytes(data)
    return spool.adopt(partial)


def test_adopted_file_is_whole_and_named_by_a_generated_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    path = _received(spool, b"DICM-bytes")
    assert path.parent == spool.instances_dir
    assert re.fullmatch(r"[0-9a-f]{32}\.dcm", path.name)
    assert path.read_bytes() == b"DICM-bytes"
    assert list(spool.tmp_dir.iterdir()) == []


def test_orphans_of_a_dead_process_are_cleaned(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (spool.tmp_dir / "half-written.dcm").write_bytes(b"x")
    kept = _received(spool, b"whole")
    assert Spool(tmp_path / "spool").clean_orphans() == 1
    assert list(spool.tmp_dir.iterdir()) == []
    assert kept.exists()


def test_discard_only_touches_spool_files(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    outside = tmp_path / "precious.dcm"
    outside.write_bytes(b"x")
    with pytest.raises(SpoolError):
        spool.discard(outside)
    assert outside.exists()
    inside = _received(spool, b"dup")
    spool.discard(inside)
    assert not inside.exists()


def test_adopt_takes_only_files_from_tmp(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    elsewhere = tmp_path / "elsewhere.dcm"
    elsewhere.write_bytes(b"x")
    with pytest.raises(SpoolError, match="not in"):
        spool.adopt(elsewhere)
    assert elsewhere.exists()
