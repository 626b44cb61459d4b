"""Stored values read straight from the file are what pydicom decodes, high bits and
signs included; other transfer syntaxes go through pydicom; an integer shift is exact
in int16 where it fits and int32 where it does not."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from infergate.inference.slices import modality_values, native_stored, read_slices

ROWS, COLUMNS = 24, 20
# Past read_slices' deferral size: the pixel data is left in the file until decoded.
LARGE = (256, 200)


def _ct_slice(
    path: Path,
    raw: npt.NDArray[np.integer[Any]],
    *,
    signed: bool,
    bits_stored: int,
    syntax: UID,
    intercept: float = -1024.0,
    slope: float = 1.0,
) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.PixelSpacing = [0.7, 0.7]
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    ds.RescaleIntercept, ds.RescaleSlope = intercept, slope
    ds.PixelData = raw.astype("<i2" if signed else "<u2").tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    else:
        meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)
    return path


def _raw(
    signed: bool, bits_stored: int, seed: int, shape: tuple[int, int] = (ROWS, COLUMNS)
) -> npt.NDArray[np.integer[Any]]:
    """Values across the stored range, with the bits above Bits Stored set at random
    (PS3.5 8.1.1: they are not part of the value)."""
    rng = np.random.default_rng(seed)
    low, high = (
        (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1)) if signed else (0, 2**bits_stored)
    )
    values = rng.integers(low, high, size=shape)
    values[0, :2] = low, high - 1
    words = values & 0xFFFF
    if bits_stored < 16:
        words |= rng.integers(0, 2 ** (16 - bits_stored), size=values.shape) << bits_stored
    return words.astype(np.uint16).view(np.int16) if signed else words.astype(np.uint16)


@pytest.mark.parametrize("shape", [(ROWS, COLUMNS), LARGE], ids=["in-memory", "deferred"])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("bits_stored", [12, 16])
@pytest.mark.parametrize(
    "syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless],
)
def test_stored_values_are_what_pydicom_decodes(
    signed: bool, bits_stored: int, syntax: UID, shape: tuple[int, int], tmp_path: Path
) -> None:
    path = _ct_slice(
        tmp_path / "slice.dcm",
        _raw(signed, bits_stored, seed=bits_stored + signed, shape=shape),
        signed=signed,
        bits_stored=bits_stored,
        syntax=syntax,
    )
    decoded = pydicom.dcmread(path).pixel_array
    # Read from the file itself only where the pixel data lies there as it is.
    native = native_stored(read_slices(path)[0])
    if syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        assert native is not None
        assert native.dtype == decoded.dtype
        np.testing.assert_array_equal(native, decoded)
    else:
        assert native is None
    (values,) = modality_values(read_slices(path))
    np.testing.assert_array_equal(values, decoded.astype(np.float32) - 1024.0)
    (whole,) = modality_values(read_slices(path), integer=True)
    np.testing.assert_array_equal(whole, decoded.astype(np.int64) - 1024)


@pytest.mark.parametrize(
    ("stored", "intercept", "dtype"),
    [
        (40000, -20000, np.int16),  # unsigned past int16, shifted back into it
        (40000, 1000, np.int32),  # past int16 after the shift
        (100, -40000, np.int32),  # a shift int16 cannot hold
        (3000, -1024, np.int16),  # the usual CT
    ],
)
def test_an_integer_shift_is_exact_in_the_narrowest_type(
    stored: int, intercept: int, dtype: type[np.signedinteger[Any]], tmp_path: Path
) -> None:
    raw = np.zeros((ROWS, COLUMNS), dtype=np.uint16)
    raw[3, 4] = stored
    path = _ct_slice(
        tmp_path / "slice.dcm",
        raw,
        signed=False,
        bits_stored=16,
        syntax=ExplicitVRLittleEndian,
        intercept=intercept,
    )
    (whole,) = modality_values(read_slices(path), integer=True)
    assert whole.dtype == dtype
    assert int(whole[3, 4]) == stored + intercept
    assert int(whole[0, 0]) == intercept


def test_pixel_data_shorter_than_the_header_says_is_left_to_pydicom(tmp_path: Path) -> None:
    raw = np.arange(ROWS * COLUMNS, dtype=np.uint16).reshape(ROWS, COLUMNS)
    path = _ct_slice(
        tmp_path / "slice.dcm", raw, signed=False, bits_stored=16, syntax=ExplicitVRLittleEndian
    )
    ds = pydicom.dcmread(path)
    ds.Rows = ROWS + 1  # more pixels than the pixel data holds
    ds.save_as(path)
    item = read_slices(path)[0]
    assert native_stored(item) is None
