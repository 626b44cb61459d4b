"""The listener, in-process on a loopback port, against pynetdicom and DCMTK peers."""

from __future__ import annotations

import io
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import structlog
from listeners import Listener, ListenerFactory
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    MRImageStorage,
    RLELossless,
)
from pynetdicom import AE, _config, evt

from infergate.config import Peer
from infergate.testing import ChestPhantom
from peers import PEER_ENV, assert_still_connected, require_program, storescu, wait_until


def _associate(port: int, called: str = "INFERGATE", calling: str = "TESTSCU") -> Any:
    ae = AE(ae_title=calling)
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


def _store_modified(listener: Listener, ds: pydicom.Dataset, path: Path) -> int:
    """Save ``ds`` to ``path``, C-STORE it as it is, and return the status."""
    ds.save_as(path)
    assoc = _associate(listener.port)
    status = _store_file(assoc, path)
    assoc.release()
    return status


def _assert_nothing_stored(listener: Listener) -> None:
    """No instance in the spool, no leftover partial file, no series recorded."""
    assert list(listener.spool.instances_dir.iterdir()) == []
    assert list(listener.spool.tmp_dir.iterdir()) == []
    assert listener.store.receiving_series() == []


def _echoscu(port: int, calling: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    """C-ECHO with DCMTK's echoscu, as ``calling``."""
    return subprocess.run(
        [require_program("echoscu"), "-aet", calling, "-aec", "INFERGATE", "127.0.0.1", str(port)],
        env=PEER_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_echo_from_dcmtk(listener: Listener) -> None:
    result = _echoscu(listener.port)
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
    with structlog.testing.capture_logs() as logs:
        status = _store_modified(listener, ds, tmp_path / "mismatch.dcm")
    assert status == 0xA900
    _assert_nothing_stored(listener)
    refused = [e for e in logs if e["event"] == "ingest.instance.refused"]
    assert refused
    assert refused[0]["status"] == "0xA900"


def test_dataset_without_series_uid_gets_c000(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(small_phantom.paths[0])
    del ds.SeriesInstanceUID
    assert _store_modified(listener, ds, tmp_path / "no-series.dcm") == 0xC000
    _assert_nothing_stored(listener)


def test_wrong_called_ae_is_rejected(listener: Listener) -> None:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def _settled(listener: Listener) -> None:
    """Wait until the listener's association threads, and their last events, are done."""
    wait_until(lambda: listener.scp.open_associations() == 0, 10, "associations to close")


def test_association_is_audited_in_the_log(listener: Listener, small_phantom: ChestPhantom) -> None:
    with structlog.testing.capture_logs() as logs:
        storescu(listener.port, list(small_phantom.paths[:3]))
        _settled(listener)
    accepted = next(e for e in logs if e["event"] == "ingest.association.accepted")
    assert accepted["calling_ae"] == "SCANNER1"
    assert accepted["peer_address"] == "127.0.0.1"
    released = next(e for e in logs if e["event"] == "ingest.association.released")
    assert released["instances"] == 3
    assert released["bytes"] == sum(
        p.stat().st_size for p in listener.spool.instances_dir.iterdir()
    )


def _try_associate(port: int, calling: str, called: str = "INFERGATE") -> Any:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    return ae.associate("127.0.0.1", port, ae_title=called)


def _reject_rsd(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected
    rj = assoc.acceptor.primitive
    return (rj.result, rj.result_source, rj.diagnostic)


def test_reject_matrix_over_the_network(make_listener: ListenerFactory) -> None:
    listener = make_listener(
        peers=(
            Peer(ae_title="SCANNER1", addresses=("127.0.0.1",)),
            Peer(ae_title="FARAWAY", addresses=("192.0.2.10",)),
        )
    )
    with structlog.testing.capture_logs() as logs:
        stranger = _try_associate(listener.port, "STRANGER")
        elsewhere = _try_associate(listener.port, "FARAWAY")
        wrong_called = _try_associate(listener.port, "SCANNER1", called="NOTUS")
        known = _try_associate(listener.port, "SCANNER1")
    assert _reject_rsd(stranger) == (1, 1, 3)
    assert _reject_rsd(elsewhere) == (1, 1, 3)
    assert _reject_rsd(wrong_called) == (1, 1, 7)
    assert known.is_established
    known.release()

    reasons = [e["reason"] for e in logs if e["event"] == "ingest.association.rejected"]
    assert len(reasons) == 3
    assert "'STRANGER' at 127.0.0.1 is not allowed in ingest.peers" in reasons[0]
    assert "'FARAWAY' at 127.0.0.1 is not allowed from this address" in reasons[1]
    assert "'NOTUS'" in reasons[2]

    audit = listener.store.associations()
    assert [(a.calling_ae, a.outcome) for a in audit] == [
        ("STRANGER", "rejected"),
        ("FARAWAY", "rejected"),
        ("SCANNER1", "rejected"),
        ("SCANNER1", "released"),
    ]
    assert audit[0].peer_address == "127.0.0.1"
    assert audit[0].reason is not None
    assert "ingest.peers" in audit[0].reason
    assert audit[0].tls is False


def test_dcmtk_peer_sees_the_reject_reason(make_listener: ListenerFactory) -> None:
    listener = make_listener(peers=(Peer(ae_title="SCANNER1", addresses=("127.0.0.1",)),))
    refused = _echoscu(listener.port, "STRANGER")
    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    admitted = _echoscu(listener.port, "SCANNER1")
    assert admitted.returncode == 0


def test_associations_per_address_are_limited(make_listener: ListenerFactory) -> None:
    listener = make_listener(max_associations_per_address=1)
    first = _try_associate(listener.port, "SCANNER1")
    assert first.is_established
    second = _try_associate(listener.port, "SCANNER1")
    assert _reject_rsd(second) == (2, 3, 2)
    first.release()
    wait_until(lambda: listener.scp.open_associations() == 0, 10, "the first to close")
    third = _try_associate(listener.port, "SCANNER1")
    assert third.is_established
    third.release()


def test_completed_association_is_audited_with_counts(
    listener: Listener, small_phantom: ChestPhantom
) -> None:
    storescu(listener.port, list(small_phantom.paths[:3]))
    _settled(listener)
    (audit,) = listener.store.associations()
    assert (audit.calling_ae, audit.called_ae, audit.outcome) == (
        "SCANNER1",
        "INFERGATE",
        "released",
    )
    assert audit.instances == 3
    assert audit.bytes == sum(p.stat().st_size for p in listener.spool.instances_dir.iterdir())
    assert audit.ended_at is not None
    assert audit.ended_at >= audit.started_at


@pytest.mark.parametrize(
    "bad_uid",
    ["../../etc/passwd", "1.2/3.4", "1.2\\3", "1.2\x003", "1." + "2" * 70, "1..2", "1.2.3."],
)
def test_uids_that_are_not_uids_are_refused(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path, bad_uid: str
) -> None:
    ds = pydicom.dcmread(small_phantom.paths[0])
    ds.SeriesInstanceUID = bad_uid
    assert _store_modified(listener, ds, tmp_path / "bad-uid.dcm") == 0xC000
    _assert_nothing_stored(listener)


def test_disk_pressure_answers_a700_then_recovers(
    make_listener: ListenerFactory, small_filesystem: Path, small_phantom: ChestPhantom
) -> None:
    listener = make_listener(spool_root=small_filesystem / "spool", min_free_bytes=16 * 2**20)
    assoc = _associate(listener.port)
    assert _store_file(assoc, small_phantom.paths[0]) == 0x0000

    ballast = small_filesystem / "ballast"
    ballast.write_bytes(b"\0" * (36 * 2**20))  # leaves ~12 MiB, under the threshold
    with structlog.testing.capture_logs() as logs:
        assert _store_file(assoc, small_phantom.paths[1]) == 0xA700
        newcomer = _try_associate(listener.port, "SCANNER1")
    assert _reject_rsd(newcomer) == (2, 3, 1)
    refused = next(e for e in logs if e["event"] == "ingest.instance.refused")
    assert "ingest.min_free_bytes" in refused["reason"]

    ballast.unlink()  # space returns; service resumes by itself
    assert _store_file(assoc, small_phantom.paths[1]) == 0x0000
    assoc.release()
    again = _try_associate(listener.port, "SCANNER1")
    assert again.is_established
    again.release()
    assert len(list(listener.spool.instances_dir.iterdir())) == 2
    assert list(listener.spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("policy", ["keep_first", "replace"])
def test_changed_instance_follows_the_policy(
    make_listener: ListenerFactory, small_phantom: ChestPhantom, tmp_path: Path, policy: str
) -> None:
    listener = make_listener(changed_instance_policy=policy)
    changed = pydicom.dcmread(small_phantom.paths[0])
    changed.SeriesDescription = "RECONSTRUCTED AGAIN"
    changed_path = tmp_path / "changed.dcm"
    changed.save_as(changed_path)
    with structlog.testing.capture_logs() as logs:
        storescu(listener.port, [small_phantom.paths[0]])
        storescu(listener.port, [changed_path])
    (stored,) = listener.spool.instances_dir.iterdir()
    expected = "SYNTHETIC CHEST 2.5MM" if policy == "keep_first" else "RECONSTRUCTED AGAIN"
    assert pydicom.dcmread(stored).SeriesDescription == expected
    event = next(e for e in logs if e["event"] == "ingest.instance.changed")
    assert event["policy"] == policy
    assert event["kept"] == ("first" if policy == "keep_first" else "new")


def _raw_connection(port: int, payload: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    if payload:
        sock.sendall(payload)
    return sock


def _closed_by_server(sock: socket.socket, within_s: float) -> bool:
    sock.settimeout(within_s)
    try:
        return sock.recv(100) == b""
    except TimeoutError:
        return False
    finally:
        sock.close()


# An A-ASSOCIATE-RQ header declaring 200 bytes, then 10 of them, then silence.
STALLED_MID_PDU = struct.pack(">BBL", 0x01, 0, 200) + b"\x00\x01" + b"x" * 8


def test_peers_that_stall_or_declare_huge_pdus_are_cut_off(
    make_listener: ListenerFactory,
) -> None:
    listener = make_listener(network_timeout_s=2)
    assert _closed_by_server(_raw_connection(listener.port, STALLED_MID_PDU), within_s=15)
    with structlog.testing.capture_logs() as logs:
        huge = _raw_connection(listener.port, struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"x")
        assert _closed_by_server(huge, within_s=15)
        oversized_request = struct.pack(">BBL", 0x01, 0, 10 * 2**20) + b"x"
        assert _closed_by_server(_raw_connection(listener.port, oversized_request), 15)
    refused = [e for e in logs if e["event"] == "ingest.pdu.refused"]
    assert [(e["pdu_type"], e["limit_bytes"]) for e in refused] == [
        ("0x04", 131072),
        ("0x01", 65536),
    ]


def test_legitimate_peer_is_served_while_others_stall(
    make_listener: ListenerFactory, small_phantom: ChestPhantom
) -> None:
    listener = make_listener(network_timeout_s=60)
    stalled = _raw_connection(listener.port, STALLED_MID_PDU)
    silent = _raw_connection(listener.port, b"")
    storescu(listener.port, list(small_phantom.paths[:10]))
    assert listener.store.receiving_series()[0].instance_count == 10
    # Both are still connected: the legitimate peer did not wait for them to time out.
    assert_still_connected(stalled, silent)


def test_any_storage_sop_class_is_accepted_and_stored_as_received(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    mr = pydicom.dcmread(small_phantom.paths[0])
    mr.SOPClassUID = mr.file_meta.MediaStorageSOPClassUID = MRImageStorage
    mr.Modality = "MR"
    path = tmp_path / "mr.dcm"
    mr.save_as(path)
    storescu(listener.port, [path])
    (stored,) = listener.spool.instances_dir.iterdir()
    assert pydicom.dcmread(stored) == pydicom.dcmread(path)
    assert listener.store.receiving_series()[0].modality == "MR"


@pytest.mark.parametrize("transfer_syntax", [ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian])
def test_instances_are_kept_in_the_transfer_syntax_they_came_in(
    listener: Listener, small_phantom: ChestPhantom, transfer_syntax: UID, tmp_path: Path
) -> None:
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        storescu(listener.port, [small_phantom.paths[0]], options=("-xd",))  # DCMTK deflates
    else:
        # DCMTK writes the big-endian file; pynetdicom sends it as it is, proposing big
        # endian alone (storescu -xb also offers little endian, which we would pick).
        big = tmp_path / "big-endian.dcm"
        subprocess.run(
            [require_program("dcmconv"), "+tb", str(small_phantom.paths[0]), str(big)],
            check=True,
            capture_output=True,
        )
        ae = AE(ae_title="SCANNER1")
        ae.add_requested_context(CTImageStorage, [transfer_syntax])
        assoc = ae.associate("127.0.0.1", listener.port, ae_title="INFERGATE")
        assert _store_file(assoc, big) == 0x0000
        assoc.release()
    (stored,) = listener.spool.instances_dir.iterdir()
    received = pydicom.dcmread(stored)
    assert received.file_meta.TransferSyntaxUID == transfer_syntax
    original = pydicom.dcmread(small_phantom.paths[0])
    assert received.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(received.pixel_array, original.pixel_array)


def test_deflate_bomb_is_refused_with_a700(
    make_listener: ListenerFactory, small_phantom: ChestPhantom
) -> None:
    listener = make_listener(max_inflated_bytes=2**20)
    bomb = pydicom.dcmread(small_phantom.paths[0])
    bomb.Rows = bomb.Columns = 2048
    bomb.PixelData = bytes(2048 * 2048 * 2)  # 8 MiB of zeros deflate to a few KiB
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(CTImageStorage, [DeflatedExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="INFERGATE")
    assert assoc.is_established
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    with structlog.testing.capture_logs() as logs:
        status = assoc.send_c_store(bomb)
    assoc.release()
    assert status.Status == 0xA700
    refused = next(e for e in logs if e["event"] == "ingest.instance.refused")
    assert "max_inflated_bytes" in refused["reason"]
    assert list(listener.spool.instances_dir.iterdir()) == []


def test_bare_tcp_connections_do_not_use_up_association_slots(
    make_listener: ListenerFactory,
) -> None:
    """Load balancer health checks and port scans connect and say nothing."""
    listener = make_listener(max_associations=2, max_associations_per_address=2)
    probes = [_raw_connection(listener.port, b"") for _ in range(4)]
    first = _try_associate(listener.port, "SCANNER1")
    second = _try_associate(listener.port, "SCANNER1")
    assert first.is_established
    assert second.is_established
    third = _try_associate(listener.port, "SCANNER1")
    assert _reject_rsd(third) == (2, 3, 2)  # real associations still count
    for assoc in (first, second):
        assoc.release()
    for probe in probes:
        probe.close()


@pytest.mark.parametrize("cut", [10_000, 100])
def test_truncated_dataset_gets_c000_and_leaves_nothing(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path, cut: int
) -> None:
    whole = small_phantom.paths[0].read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(whole[:-cut])  # the pixel data ends early
    assoc = _associate(listener.port)
    with structlog.testing.capture_logs() as logs:
        status = _store_file(assoc, truncated)
    assoc.release()
    assert status == 0xC000
    refused = next(e for e in logs if e["event"] == "ingest.instance.refused")
    assert "truncated" in refused["reason"]
    _assert_nothing_stored(listener)


def _deeply_nested(source: Path, levels: int, out: Path) -> None:
    """``source`` with ``levels`` nested undefined-length sequences before its pixel data,
    written by hand (pydicom's writer would recurse as deep as its reader)."""
    ds = pydicom.dcmread(source)
    pixels = ds.PixelData
    del ds.PixelData
    head = io.BytesIO()
    ds.save_as(head, enforce_file_format=True)
    undefined = b"\xff\xff\xff\xff"
    opening = (b"\x40\x00\x30\xa7" + b"SQ\x00\x00" + undefined) + (b"\xfe\xff\x00\xe0" + undefined)
    closing = (b"\xfe\xff\x0d\xe0" + b"\x00" * 4) + (b"\xfe\xff\xdd\xe0" + b"\x00" * 4)
    pixel_element = b"\xe0\x7f\x10\x00" + b"OW\x00\x00" + struct.pack("<L", len(pixels))
    out.write_bytes(head.getvalue() + opening * levels + closing * levels + pixel_element + pixels)


def test_absurdly_deep_sequence_nesting_is_refused_and_the_listener_carries_on(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    nested = tmp_path / "nested.dcm"
    _deeply_nested(small_phantom.paths[0], levels=20_000, out=nested)
    assoc = _associate(listener.port)
    with structlog.testing.capture_logs() as logs:
        assert _store_file(assoc, nested) == 0xC000
        assert _store_file(assoc, small_phantom.paths[1]) == 0x0000
    assoc.release()
    refused = next(e for e in logs if e["event"] == "ingest.instance.refused")
    assert "cannot be decoded" in refused["reason"]
    assert len(list(listener.spool.instances_dir.iterdir())) == 1
    assert list(listener.spool.tmp_dir.iterdir()) == []


def test_connection_lost_mid_dataset_leaves_no_partial_file(
    listener: Listener, small_phantom: ChestPhantom
) -> None:
    sent: list[int] = []

    def cut_after_two_fragments(event: evt.Event) -> None:
        # The requestor's side: after the command and one dataset fragment, the
        # connection drops as a crashed scanner's would.
        if event.pdu.__class__.__name__ == "P_DATA_TF":
            sent.append(1)
            wrapper = event.assoc.dul.socket
            if len(sent) == 2 and wrapper is not None and wrapper.socket is not None:
                wrapper.socket.shutdown(socket.SHUT_RDWR)

    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    ae.maximum_pdu_size = 16384
    assoc = ae.associate(
        "127.0.0.1",
        listener.port,
        ae_title="INFERGATE",
        evt_handlers=[(evt.EVT_PDU_SENT, cut_after_two_fragments)],
    )
    assert assoc.is_established
    with structlog.testing.capture_logs() as logs:
        status = assoc.send_c_store(pydicom.dcmread(small_phantom.paths[0]))
        assert "Status" not in status  # no response: the connection is gone
        wait_until(
            lambda: any(e["event"] == "ingest.association.aborted" for e in logs),
            15,
            "the listener to see the connection lost",
        )
    assoc.abort()
    incomplete = next(e for e in logs if e["event"] == "ingest.instance.incomplete")
    assert incomplete["files_removed"] == 1
    _assert_nothing_stored(listener)
    # The listener carries on.
    storescu(listener.port, list(small_phantom.paths[:2]))
    assert listener.store.receiving_series()[0].instance_count == 2


@pytest.mark.parametrize(
    ("proposed", "chosen"),
    [
        # Lossless compressed data is kept as it is.
        ([JPEGLSLossless, ExplicitVRLittleEndian], JPEGLSLossless),
        ([ExplicitVRLittleEndian, RLELossless], RLELossless),
        # A peer never has to compress lossily for us: uncompressed wins over lossy.
        ([JPEGBaseline8Bit, ExplicitVRLittleEndian], ExplicitVRLittleEndian),
        ([JPEG2000, ImplicitVRLittleEndian], ImplicitVRLittleEndian),
        # A peer that holds lossy data and offers only that still sends it.
        ([JPEGBaseline8Bit], JPEGBaseline8Bit),
    ],
)
def test_transfer_syntax_choice_never_asks_for_lossy_compression(
    listener: Listener, proposed: list[UID], chosen: UID
) -> None:
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(CTImageStorage, proposed)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="INFERGATE")
    assert assoc.is_established
    (context,) = assoc.accepted_contexts
    assoc.release()
    assert context.transfer_syntax[0] == chosen
