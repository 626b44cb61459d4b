"""The listener, in-process on a loopback port, against pynetdicom and DCMTK peers."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, _config

from infergate.config import IngestSettings
from infergate.dicom.scp import StorageSCP
from infergate.dicom.spool import Spool
from infergate.store import Store
from infergate.testing import ChestPhantom
from peers import PEER_ENV, free_port, require_program, storescu


@dataclass
class Listener:
    scp: StorageSCP
    store: Store
    spool: Spool
    port: int


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    port = free_port()
    settings = IngestSettings(host="127.0.0.1", port=port, network_timeout_s=10)
    store = Store(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    scp = StorageSCP(settings, spool, store)
    scp.start()
    yield Listener(scp, store, spool, port)
    scp.stop()
    store.close()


def _associate(port: int, called: str = "INFERGATE") -> Any:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.add_requested_context(MRImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_established
    return assoc


def _store_file(assoc: Any, path: Path) -> int:
    """C-STORE a file as it is, streamed: the command's UIDs come from its file meta."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
    return int(status.Status)


def test_echo_from_dcmtk(listener: Listener) -> None:
    echoscu = require_program("echoscu")
    result = subprocess.run(
        [echoscu, "-aec", "INFERGATE", "127.0.0.1", str(listener.port)],
        env=PEER_ENV,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_store_spools_bytes_as_received_and_records_them(
    listener: Listener, small_phantom: ChestPhantom
) -> None:
    storescu(listener.port, list(small_phantom.paths[:5]))
    (series,) = listener.store.receiving_series()
    assert series.instance_count == 5
    assert (series.calling_ae, series.called_ae) == ("SCANNER1", "INFERGATE")
    paths = listener.store.instance_paths(small_phantom.series_uid)
    assert len(paths) == 5
    originals = {
        pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in small_phantom.paths[:5]
    }
    for path in paths:
        assert path.parent == listener.spool.instances_dir
        received = pydicom.dcmread(path)
        original = originals[received.SOPInstanceUID]
        assert received.PixelData == original.PixelData
        assert received.PatientID == original.PatientID
        # No DICOM value in the file name.
        assert received.SOPInstanceUID not in path.name


def test_identical_resend_is_success_without_a_second_copy(
    listener: Listener, small_phantom: ChestPhantom
) -> None:
    with structlog.testing.capture_logs() as logs:
        storescu(listener.port, [small_phantom.paths[0]])
        storescu(listener.port, [small_phantom.paths[0]])
    assert len(list(listener.spool.instances_dir.iterdir())) == 1
    assert listener.store.receiving_series()[0].instance_count == 1
    assert [e["event"] for e in logs].count("ingest.instance.duplicate") == 1


def test_uid_mismatch_gets_a900_and_stores_nothing(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(small_phantom.paths[0])
    ds.file_meta.MediaStorageSOPInstanceUID = UID("1.2.3.999")
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path)
    assoc = _associate(listener.port)
    with structlog.testing.capture_logs() as logs:
        status = _store_file(assoc, path)
    assoc.release()
    assert status == 0xA900
    assert list(listener.spool.instances_dir.iterdir()) == []
    refused = [e for e in logs if e["event"] == "ingest.instance.refused"]
    assert refused
    assert refused[0]["status"] == "0xA900"


def test_dataset_without_series_uid_gets_c000(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(small_phantom.paths[0])
    del ds.SeriesInstanceUID
    path = tmp_path / "no-series.dcm"
    ds.save_as(path)
    assoc = _associate(listener.port)
    status = _store_file(assoc, path)
    assoc.release()
    assert status == 0xC000
    assert list(listener.spool.instances_dir.iterdir()) == []
    assert list(listener.spool.tmp_dir.iterdir()) == []


def test_wrong_called_ae_is_rejected(listener: Listener) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def test_association_is_audited_in_the_log(listener: Listener, small_phantom: ChestPhantom) -> None:
    with structlog.testing.capture_logs() as logs:
        storescu(listener.port, list(small_phantom.paths[:3]))
    accepted = next(e for e in logs if e["event"] == "ingest.association.accepted")
    assert accepted["calling_ae"] == "SCANNER1"
    assert accepted["peer_address"] == "127.0.0.1"
    released = next(e for e in logs if e["event"] == "ingest.association.released")
    assert released["instances"] == 3
    assert released["bytes"] == sum(
        p.stat().st_size for p in listener.spool.instances_dir.iterdir()
    )
