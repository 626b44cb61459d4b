"""The fast walk over received datasets: agrees with pydicom, and declines what it does not know."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from infergate.dicom.elements import MAX_DEPTH, identifying_values
from infergate.ingest.received import read_header
from infergate.testing import ChestPhantom

NAMES = ("sop_class_uid", "sop_instance_uid", "modality", "study_uid", "series_uid")


def encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = little
    fp.is_implicit_VR = implicit
    write_dataset(fp, ds)
    return fp.getvalue()


def dataset(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def expected(ds: Dataset) -> dict[str, str]:
    return {
        "sop_class_uid": str(ds.SOPClassUID),
        "sop_instance_uid": str(ds.SOPInstanceUID),
        "modality": str(ds.Modality),
        "study_uid": str(ds.StudyInstanceUID),
        "series_uid": str(ds.SeriesInstanceUID),
    }


ITEM = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
ITEM_END = struct.pack("<HHL", 0xFFFE, 0xE00D, 0)
SEQUENCE_END = struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)


def undefined_sequence(*items: bytes) -> bytes:
    """(0008,1140) SQ of undefined length, items of undefined length, explicit VR LE:
    pydicom writes defined lengths, scanners often do not."""
    head = struct.pack("<HH2s2xL", 0x0008, 0x1140, b"SQ", 0xFFFFFFFF)
    return head + b"".join(ITEM + item + ITEM_END for item in items) + SEQUENCE_END


def walk(data: bytes, *, implicit: bool = False, little: bool = True) -> dict[str, str] | None:
    return identifying_values(data, 0, explicit=not implicit, little=little)


@pytest.fixture
def instance(small_phantom: ChestPhantom) -> Dataset:
    ds = pydicom.dcmread(small_phantom.paths[0])
    # A referenced instance inside a sequence must not be taken for the instance itself.
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = "1.2.3.4"
    ref.SOPInstanceUID = "1.2.3.5"
    ds.ReferencedImageSequence = Sequence([ref])
    return ds


@pytest.mark.parametrize(
    ("implicit", "little"), [(False, True), (True, True), (False, False)], ids=["ELE", "ILE", "EBE"]
)
def test_walk_reads_what_pydicom_reads(instance: Dataset, implicit: bool, little: bool) -> None:
    data = encode(instance, implicit=implicit, little=little)
    assert walk(data, implicit=implicit, little=little) == expected(instance)


def test_walk_skips_undefined_length_sequences_and_encapsulated_pixel_data(
    instance: Dataset,
) -> None:
    del instance.ReferencedImageSequence
    instance.compress(RLELossless)
    data = encode(instance)
    assert data.endswith(SEQUENCE_END)  # encapsulated pixel data ends in a sequence delimiter
    item = encode(dataset(SOPInstanceUID="1.2.3.5", ReferencedSOPInstanceUID="1.2.3.4"))
    at = data.index(b"\x20\x00\x0d\x00")  # Study Instance UID: after (0008,1140)
    data = data[:at] + undefined_sequence(item, item) + data[at:]
    assert walk(data) == expected(instance)


def test_read_header_agrees_on_the_real_head_ct(head_ct: list[Path]) -> None:
    for path in head_ct[:3]:
        ds = pydicom.dcmread(path)
        header = read_header(path, str(ds.SOPInstanceUID), ds.file_meta.TransferSyntaxUID)
        assert {name: getattr(header, name) for name in NAMES} == expected(ds)


def test_absent_attributes_are_absent(instance: Dataset) -> None:
    del instance.Modality
    values = walk(encode(instance))
    assert values is not None
    assert "modality" not in values


@pytest.mark.parametrize("cut", [1, 7, 100, 4000])
def test_truncated_data_is_declined(instance: Dataset, cut: int) -> None:
    data = encode(instance)
    assert walk(data[:-cut]) is None


def test_trailing_bytes_are_declined(instance: Dataset) -> None:
    assert walk(encode(instance) + b"\x00\x00\x00") is None


def test_unknown_vr_is_declined(instance: Dataset) -> None:
    data = bytearray(encode(instance))
    at = data.index(b"\x08\x00\x60\x00CS")  # Modality
    data[at + 4 : at + 6] = b"QQ"
    assert walk(bytes(data)) is None


def test_undefined_length_un_is_declined() -> None:
    data = struct.pack("<HH2s2xL", 0x0009, 0x1010, b"UN", 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE0DD, 0
    )
    assert walk(data) is None


def test_item_where_an_element_belongs_is_declined() -> None:
    assert walk(struct.pack("<HHL", 0xFFFE, 0xE000, 0)) is None


def test_sequence_without_its_delimiter_is_declined() -> None:
    data = undefined_sequence(encode(dataset(Modality="CT", SOPInstanceUID="1.2.3")))
    assert walk(data) == {}
    assert walk(data[: -len(SEQUENCE_END)]) is None
    assert walk(data.replace(ITEM_END, b"")) is None


def nested(depth: int) -> bytes:
    inner = encode(dataset(SOPInstanceUID="1.2.3"))
    for _ in range(depth):
        inner = undefined_sequence(inner)
    return encode(dataset(Modality="CT")) + inner


def test_nesting_up_to_the_bound_is_walked_and_deeper_declined() -> None:
    assert walk(nested(MAX_DEPTH)) == {"modality": "CT"}
    assert walk(nested(MAX_DEPTH + 1)) is None


def test_files_in_each_plain_syntax_take_the_fast_path(
    instance: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def slow_path(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the fast walk declined")

    monkeypatch.setattr("infergate.ingest.received._read_with_pydicom", slow_path)
    for syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian):
        path = tmp_path / f"{syntax.name}.dcm"
        instance.file_meta.TransferSyntaxUID = syntax
        dcmwrite(
            path,
            instance,
            implicit_vr=syntax.is_implicit_VR,
            little_endian=syntax.is_little_endian,
            force_encoding=True,
        )
        header = read_header(path, str(instance.SOPInstanceUID), syntax)
        assert header.series_uid == str(instance.SeriesInstanceUID)
