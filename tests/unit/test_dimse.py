"""Command sets read and written by the listener, checked against pynetdicom and pydicom."""

from __future__ import annotations

import io

import pytest
from pydicom.filereader import read_dataset
from pydicom.uid import CTImageStorage
from pynetdicom import dimse_messages
from pynetdicom.dimse_primitives import C_STORE

from infergate.errors import AssociationError
from infergate.ingest.dimse import C_STORE_RQ, Command, decode_command, encode_response
from infergate.ingest.upper_layer import COMMAND, LAST, pdata, pdvs

INSTANCE = "1.2.826.0.1.3680043.8.498.1"


def _pynetdicom_store_command(message_id: int = 7) -> bytes:
    """A C-STORE-RQ command set as pynetdicom encodes it for the wire."""
    primitive = C_STORE()
    primitive.MessageID = message_id
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = INSTANCE
    primitive.Priority = 0
    primitive.DataSet = io.BytesIO(b"\0" * 16)
    message = dimse_messages.C_STORE_RQ()
    message.primitive_to_message(primitive)
    command = b""
    for data in message.encode_msg(1, 16382):
        for _, value in data.presentation_data_value_list:
            if value[0] & COMMAND:
                command += value[1:]
    return command


def test_a_store_request_from_pynetdicom_is_read() -> None:
    command = decode_command(_pynetdicom_store_command(message_id=513))
    assert command == Command(
        field=C_STORE_RQ,
        message_id=513,
        sop_class_uid=CTImageStorage,
        sop_instance_uid=INSTANCE,
        has_dataset=True,
    )


def test_a_response_reads_back_with_pydicom() -> None:
    request = decode_command(_pynetdicom_store_command())
    encoded = encode_response(request, 0xA900, "SOP Instance UID differs")
    ds = read_dataset(io.BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert ds.CommandGroupLength == len(encoded) - 12
    assert ds.CommandField == 0x8001
    assert ds.MessageIDBeingRespondedTo == 7
    assert ds.CommandDataSetType == 0x0101
    assert ds.Status == 0xA900
    assert ds.ErrorComment == "SOP Instance UID differs"
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CTImageStorage, INSTANCE)
    assert [e.tag for e in ds] == sorted(e.tag for e in ds)


def test_a_long_error_comment_is_cut_to_what_lo_holds() -> None:
    request = decode_command(_pynetdicom_store_command())
    encoded = encode_response(request, 0xC000, "x" * 200)
    ds = read_dataset(io.BytesIO(encoded), is_implicit_VR=True, is_little_endian=True)
    assert len(ds.ErrorComment) == 64


@pytest.mark.parametrize(
    "broken",
    [
        _pynetdicom_store_command()[:-3],  # cut inside the last value
        _pynetdicom_store_command()[:5],  # cut inside an element header
        b"\x08\x00\x18\x00\x02\x00\x00\x001\x00",  # an element outside group 0000
        b"\x00\x00\x02\x00\x02\x00\x00\x001\x00",  # no command field
    ],
)
def test_what_is_not_a_command_set_is_refused(broken: bytes) -> None:
    with pytest.raises(AssociationError):
        decode_command(broken)


def test_pdata_fits_the_peer_maximum_and_reassembles() -> None:
    data = bytes(range(256)) * 3
    pdus = pdata(3, COMMAND, data, max_pdu=100)
    assert all(len(p) <= 100 + 6 for p in pdus)
    pieces = [list(pdvs(memoryview(p)[6:])) for p in pdus]
    assert all(len(items) == 1 for items in pieces)
    flat = [item for items in pieces for item in items]
    assert b"".join(bytes(view) for _, _, view in flat) == data
    assert [control for _, control, _ in flat] == [COMMAND] * (len(flat) - 1) + [COMMAND | LAST]
    assert {context for context, _, _ in flat} == {3}


def test_a_pdv_longer_than_its_pdu_is_refused() -> None:
    body = memoryview(b"\x00\x00\x10\x00\x01\x03" + b"x" * 10)
    with pytest.raises(AssociationError, match="impossible length"):
        list(pdvs(body))
