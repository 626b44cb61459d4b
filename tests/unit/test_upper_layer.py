"""The listener's upper layer against requests pynetdicom's own SCU would never send.

A raw peer builds its PDUs with pynetdicom's encoders (independent of the listener's
own command-set code) and speaks them over a plain socket, so each rule of PS3.7 and
PS3.8 the listener enforces can be broken one at a time.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
import subprocess
from pathlib import Path
from typing import Any

import pydicom
import structlog
from listeners import Listener, ListenerFactory
from pydicom.filereader import read_dataset
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, MRImageStorage
from pynetdicom import AE, build_role, pdu, pdu_primitives
from pynetdicom.dimse_messages import C_FIND_RQ, C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_FIND, C_STORE
from pynetdicom.presentation import build_context

from infergate.ingest.incoming import IMPLEMENTATION_CLASS_UID
from infergate.testing import ChestPhantom
from peers import PEER_ENV, require_program, wait_until

DICOM_APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


class RawPeer:
    """A requestor that sends exactly the PDUs a test gives it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def associate(
        self, contexts: list[str], application_context: str = DICOM_APPLICATION_CONTEXT
    ) -> tuple[int, bytes]:
        self.sock.sendall(_request_bytes(contexts, application_context))
        return self.read_pdu()

    def read_pdu(self) -> tuple[int, bytes]:
        header = self._exactly(6)
        if not header:
            return 0, b""
        pdu_type, length = struct.unpack(">BxL", header)
        return pdu_type, header + self._exactly(length)

    def _exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = self.sock.recv(count - len(data))
            if not chunk:
                return data
            data += chunk
        return data

    def send_message(self, message: DIMSEMessage, context_id: int) -> None:
        for primitive in message.encode_msg(context_id, 16382):
            encoded = pdu.P_DATA_TF()
            encoded.from_primitive(primitive)
            self.sock.sendall(encoded.encode())

    def response(self) -> pydicom.Dataset:
        """The command set of the next response."""
        command = b""
        while True:
            pdu_type, data = self.read_pdu()
            assert pdu_type == 0x04, f"expected P-DATA-TF, got 0x{pdu_type:02X}"
            decoded = pdu.P_DATA_TF()
            decoded.decode(data)
            for _, value in decoded.to_primitive().presentation_data_value_list:
                command += value[1:]
                if value[0] & 0x02:
                    return read_dataset(io.BytesIO(command), True, True)

    def close(self) -> None:
        self.sock.close()


def _store_message(sop_class: str, dataset: bytes, instance: str = "1.2.3.4.5") -> C_STORE_RQ:
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = instance
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    return message


def _ct_association(port: int, **options: Any) -> Any:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="INFERGATE", **options)
    assert assoc.is_established
    return assoc


def _outcomes(listener: Listener) -> list[tuple[str, str | None]]:
    return [(a.outcome, a.reason) for a in listener.store.associations()]


def test_accept_names_infergate_and_its_maximum_pdu(make_listener: ListenerFactory) -> None:
    listener = make_listener(max_pdu_length=65536)
    peer = RawPeer(listener.port)
    pdu_type, data = peer.associate([CTImageStorage])
    assert pdu_type == 0x02
    accept = pdu.A_ASSOCIATE_AC()
    accept.decode(data)
    primitive = accept.to_primitive()
    assert primitive.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert primitive.maximum_length_received == 65536
    [context] = primitive.presentation_context_definition_results_list
    assert (context.context_id, context.result) == (1, 0)
    peer.close()


def test_a_foreign_application_context_is_rejected_and_audited(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    pdu_type, data = peer.associate([CTImageStorage], application_context="1.2.3.4.5.6")
    assert pdu_type == 0x03
    assert tuple(data[7:10]) == (1, 1, 2)  # permanent, service user, context not supported
    peer.close()
    [(outcome, reason)] = _outcomes(listener)
    assert outcome == "rejected"
    assert reason is not None
    assert "application context" in reason


def test_store_under_another_sop_class_context_gets_0122(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    assert peer.associate([MRImageStorage])[0] == 0x02
    peer.send_message(_store_message(CTImageStorage, b"\x08\x00\x18\x00UI\x02\x001\x00"), 1)
    response = peer.response()
    assert response.Status == 0x0122
    assert response.MessageIDBeingRespondedTo == 1
    peer.close()
    assert list(listener.spool.instances_dir.iterdir()) == []
    wait_until(lambda: not list(listener.spool.tmp_dir.iterdir()), 5, "tmp/ empty")


def test_an_operation_the_listener_does_not_offer_gets_0211(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    assert peer.associate([CTImageStorage])[0] == 0x02
    primitive = C_FIND()
    primitive.MessageID = 9
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.Priority = 0
    identifier = pydicom.Dataset()
    identifier.PatientID = ""
    buffer = io.BytesIO()
    identifier.save_as(buffer, implicit_vr=False, little_endian=True)
    primitive.Identifier = buffer
    message = C_FIND_RQ()
    message.primitive_to_message(primitive)
    peer.send_message(message, 1)
    assert peer.response().Status == 0x0211
    peer.close()


def _expect_abort(peer: RawPeer) -> None:
    pdu_type, data = peer.read_pdu()
    assert pdu_type == 0x07
    assert data[8] == 0x02  # the service provider aborted
    assert peer.read_pdu() == (0, b"")  # and closed


def test_data_for_a_context_never_accepted_aborts(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    assert peer.associate([CTImageStorage])[0] == 0x02
    peer.send_message(_store_message(CTImageStorage, b"\0" * 8), context_id=5)
    _expect_abort(peer)
    wait_until(lambda: [o for o, _ in _outcomes(listener)] == ["aborted"], 5, "audited abort")
    [(_, reason)] = _outcomes(listener)
    assert reason is not None
    assert "context 5" in reason


def test_an_unknown_pdu_type_aborts(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    assert peer.associate([CTImageStorage])[0] == 0x02
    peer.sock.sendall(struct.pack(">BxL", 0x09, 4) + bytes(4))
    _expect_abort(peer)


def test_a_dataset_without_its_command_aborts(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    assert peer.associate([CTImageStorage])[0] == 0x02
    pdv = struct.pack(">LBB", 6, 1, 0x02) + b"\0" * 4  # a last data fragment, no command
    peer.sock.sendall(struct.pack(">BxL", 0x04, len(pdv)) + pdv)
    _expect_abort(peer)


def test_small_pdus_and_role_selection_from_a_real_peer(
    make_listener: ListenerFactory, small_phantom: ChestPhantom
) -> None:
    listener = make_listener(max_pdu_length=4096)  # each image arrives in ~130 PDUs
    role = build_role(CTImageStorage, scu_role=True, scp_role=False)
    assoc = _ct_association(listener.port, ext_neg=[role])
    path = small_phantom.paths[0]
    status = assoc.send_c_store(pydicom.dcmread(path))
    assoc.release()
    assert status.Status == 0x0000
    [stored] = list(listener.spool.instances_dir.iterdir())
    assert pydicom.dcmread(stored).SOPInstanceUID == pydicom.dcmread(path).SOPInstanceUID


def test_spooled_files_carry_a_file_meta_dcmtk_reads(
    listener: Listener, small_phantom: ChestPhantom
) -> None:
    assoc = _ct_association(listener.port)
    source = pydicom.dcmread(small_phantom.paths[0])
    assert assoc.send_c_store(source).Status == 0x0000
    assoc.release()
    [stored] = list(listener.spool.instances_dir.iterdir())
    meta = pydicom.dcmread(stored).file_meta
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "TESTSCU"
    assert meta.MediaStorageSOPInstanceUID == source.SOPInstanceUID
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    dump = _dcmdump(stored)
    assert IMPLEMENTATION_CLASS_UID in dump
    assert source.SOPInstanceUID in dump


def _dcmdump(path: Path) -> Any:
    result = subprocess.run(
        [require_program("dcmdump"), "-M", str(path)],
        env=PEER_ENV,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert "E:" not in result.stderr, result.stderr
    return result.stdout


def test_a_spool_that_cannot_take_a_dataset_answers_a_status_not_an_abort(
    listener: Listener, small_phantom: ChestPhantom
) -> None:
    assoc = _ct_association(listener.port)
    first, second = (pydicom.dcmread(p) for p in small_phantom.paths[:2])
    listener.spool.tmp_dir.rmdir()  # where datasets are written: gone
    refused = assoc.send_c_store(first)
    assert refused.Status == 0x0110
    assert "spool could not take" in refused.ErrorComment
    listener.spool.tmp_dir.mkdir()
    assert assoc.send_c_store(second).Status == 0x0000  # the same association goes on
    assoc.release()
    [stored] = list(listener.spool.instances_dir.iterdir())
    assert pydicom.dcmread(stored).SOPInstanceUID == second.SOPInstanceUID
    [audit] = listener.store.associations()
    assert (audit.outcome, audit.instances, audit.failures) == ("released", 1, 1)


def test_a_malformed_association_request_is_aborted_and_leaves_nothing_open(
    listener: Listener,
) -> None:
    peer = RawPeer(listener.port)
    with structlog.testing.capture_logs() as logs:
        peer.sock.sendall(struct.pack(">BxL", 0x01, 20) + b"\xff" * 20)
        _expect_abort(peer)
        wait_until(lambda: any(e["event"] == "ingest.connection.failed" for e in logs), 5, "logged")
    assert not any(e["event"] == "ingest.association.error" for e in logs)
    assert listener.store.associations() == []
    peer.close()
    wait_until(lambda: listener.scp.open_associations() == 0, 5, "connection thread ended")


def _request_bytes(
    contexts: list[str],
    application_context: str = DICOM_APPLICATION_CONTEXT,
    calling: str = "TESTSCU",
) -> bytes:
    """An A-ASSOCIATE-RQ proposing ``contexts``, encoded by pynetdicom, with ``calling``
    written over its calling AE title field afterwards (pynetdicom's encoder would
    refuse a blank one)."""
    request = pdu_primitives.A_ASSOCIATE()
    request.application_context_name = application_context
    request.calling_ae_title = "TESTSCU"
    request.called_ae_title = "INFERGATE"
    proposed = []
    for index, sop_class in enumerate(contexts):
        context = build_context(sop_class, [ExplicitVRLittleEndian])
        context.context_id = 2 * index + 1
        proposed.append(context)
    request.presentation_context_definition_list = proposed
    maximum = pdu_primitives.MaximumLengthNotification()
    maximum.maximum_length_received = 16382
    implementation = pdu_primitives.ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    request.user_information = [maximum, implementation]
    encoded = pdu.A_ASSOCIATE_RQ()
    encoded.from_primitive(request)
    data = bytearray(encoded.encode())
    data[26:42] = calling.ljust(16).encode()  # header 6 + version 2 + reserved 2 + called 16
    return bytes(data)


def test_a_blank_calling_ae_title_is_rejected_with_its_reason_and_audited(
    listener: Listener,
) -> None:
    peer = RawPeer(listener.port)
    peer.sock.sendall(_request_bytes([CTImageStorage], calling=" " * 16))
    pdu_type, data = peer.read_pdu()
    assert pdu_type == 0x03
    assert tuple(data[7:10]) == (1, 1, 3)  # permanent, service user, calling AE not recognised
    peer.close()
    [(outcome, reason)] = _outcomes(listener)
    assert (outcome, reason) == ("rejected", "the calling AE title is blank")


def test_a_request_dripped_a_byte_at_a_time_is_cut_off_at_the_acse_timeout(
    make_listener: ListenerFactory,
) -> None:
    """Each byte comes well within the read timeout; the request as a whole does not."""
    listener = make_listener(acse_timeout_s=1.0, network_timeout_s=10)
    request = _request_bytes([CTImageStorage])
    peer = RawPeer(listener.port)
    closed_after = None
    for sent, byte in enumerate(request):
        try:
            peer.sock.sendall(bytes([byte]))
        except OSError:  # reset: the listener closed the connection
            closed_after = sent
            break
        peer.sock.settimeout(0.2)
        try:
            if peer.sock.recv(1) == b"":
                closed_after = sent + 1
                break
        except TimeoutError:
            continue
    peer.close()
    assert closed_after is not None, "the listener waited for the whole dripped request"
    assert closed_after < len(request)
    assert listener.store.associations() == []  # it never asked: nothing to audit


def test_connections_that_never_associate_are_capped_per_address(
    make_listener: ListenerFactory,
) -> None:
    listener = make_listener(max_unassociated_per_address=3, acse_timeout_s=30)
    idle = [socket.create_connection(("127.0.0.1", listener.port)) for _ in range(3)]
    wait_until(lambda: listener.scp.open_associations() == 3, 5, "three idle connections")
    with structlog.testing.capture_logs() as logs:
        extra = socket.create_connection(("127.0.0.1", listener.port), timeout=5)
        assert extra.recv(1) == b""  # closed at once, unread
    (refused,) = [e for e in logs if e["event"] == "ingest.connection.refused"]
    assert "have not yet sent an association request" in refused["reason"]
    extra.close()
    for sock in idle:
        sock.close()
    wait_until(lambda: listener.scp.open_associations() == 0, 10, "idle connections closed")
    _ct_association(listener.port).release()  # a real peer gets in again


def test_command_fragments_that_never_end_abort_the_association(listener: Listener) -> None:
    peer = RawPeer(listener.port)
    assert peer.associate([CTImageStorage])[0] == 0x02
    chunk = b"\0" * 8000
    pdv = struct.pack(">LB", len(chunk) + 2, 1) + bytes([0x01]) + chunk  # command, not last
    with contextlib.suppress(OSError):  # the listener may close while we still send
        for _ in range(4):
            peer.sock.sendall(struct.pack(">BxL", 0x04, len(pdv)) + pdv)
    _expect_abort(peer)
    wait_until(lambda: [o for o, _ in _outcomes(listener)] == ["aborted"], 5, "audited abort")
    [(_, reason)] = _outcomes(listener)
    assert reason is not None
    assert "command set over 16384 bytes" in reason


def test_a_retired_storage_sop_class_is_accepted_and_stored_as_received(
    listener: Listener, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    retired_us = UID("1.2.840.10008.5.1.4.1.1.6")  # Ultrasound Image Storage (Retired)
    ds = pydicom.dcmread(small_phantom.paths[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = retired_us
    ds.Modality = "US"
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(retired_us, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", listener.port, ae_title="INFERGATE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    (stored,) = listener.store.series_instances(str(ds.SeriesInstanceUID))
    assert pydicom.dcmread(stored[1]).SOPClassUID == retired_us
