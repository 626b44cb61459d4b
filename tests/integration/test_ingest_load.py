"""Load: 8 concurrent storescu associations x 500 instances into the listener processes.

Every instance must be stored exactly once, acknowledged, and kept byte for byte as it
was sent (the dataset; the file meta is the receiver's own). Counts come from what
was stored, not from storescu's exit codes.
"""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from infergate.config import IngestSettings, Settings, StorageSettings
from infergate.ingest.listener_pool import ListenerPool
from infergate.store import Store
from infergate.testing import ChestPhantom
from peers import PEER_ENV, free_port, require_program

pytestmark = pytest.mark.integration

ASSOCIATIONS = 8
PER_ASSOCIATION = 500


def _dataset_bytes(path: Path) -> bytes:
    """The encoded dataset after the preamble and file meta."""
    data = path.read_bytes()
    (meta_length,) = struct.unpack_from("<L", data, 140)
    return data[144 + meta_length :]


def _write_instances(template: Path, folder: Path) -> list[list[str]]:
    """ASSOCIATIONS series of PER_ASSOCIATION small, distinct CT instances."""
    ds = pydicom.dcmread(template)
    pixels = np.asarray(ds.pixel_array)[::8, ::8].copy()  # 32x32: the test is about counts
    ds.Rows, ds.Columns = pixels.shape
    rng = np.random.default_rng(7)
    batches = []
    for batch in range(ASSOCIATIONS):
        ds.SeriesInstanceUID = generate_uid()
        paths = []
        for number in range(PER_ASSOCIATION):
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.InstanceNumber = number + 1
            noise = rng.integers(0, 50, pixels.shape, dtype=pixels.dtype)
            ds.PixelData = (pixels + noise).tobytes()
            path = folder / f"{batch}-{number}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(str(path))
        batches.append(paths)
    return batches


def test_eight_concurrent_associations_of_500_lose_nothing(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    batches = _write_instances(small_phantom.paths[0], tmp_path)
    settings = Settings(
        ingest=IngestSettings(host="127.0.0.1", port=free_port(), min_free_bytes=0),
        storage=StorageSettings(var_dir=tmp_path / "var"),
    )
    pool = ListenerPool(settings, Store(settings.storage.database))
    pool.start()
    try:
        binary, port = require_program("storescu"), str(settings.ingest.port)
        senders = [
            subprocess.Popen(
                [binary, "-aet", f"MODALITY{i}", "-aec", "INFERGATE", "127.0.0.1", port, *paths],
                env=PEER_ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for i, paths in enumerate(batches)
        ]
        for sender in senders:
            _, errors = sender.communicate(timeout=600)
            assert sender.returncode == 0, errors.decode()[-2000:]
    finally:
        pool.stop()
    store = pool.store
    audit = store.associations()
    assert [(a.outcome, a.instances, a.failures) for a in audit] == [
        ("released", PER_ASSOCIATION, 0)
    ] * ASSOCIATIONS
    series = store.receiving_series()
    assert sorted(s.instance_count for s in series) == [PER_ASSOCIATION] * ASSOCIATIONS
    stored = list((settings.storage.spool_dir / "instances").iterdir())
    assert len(stored) == ASSOCIATIONS * PER_ASSOCIATION
    originals = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for paths in batches
        for p in paths
    }
    for path in stored:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert _dataset_bytes(path) == _dataset_bytes(Path(originals.pop(uid)))
    assert originals == {}  # each sent instance stored exactly once
    assert [p for p in (settings.storage.spool_dir / "tmp").rglob("*") if p.is_file()] == []
