from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from infergate.dicom.volume import load_series
from infergate.errors import VolumeError
from infergate.testing import ChestPhantom


def test_slices_are_ordered_along_the_normal_not_by_instance_number(
    small_phantom: ChestPhantom,
) -> None:
    loaded = load_series(sorted(small_phantom.paths))
    z = [float(h.ImagePositionPatient[2]) for h in loaded.headers]
    # Normal (0,0,1): increasing z, whatever the instance numbers and file names say.
    assert z == sorted(z)
    numbers = [int(h.InstanceNumber) for h in loaded.headers]
    assert numbers != sorted(numbers)
    assert loaded.series.spacing == pytest.approx((6.0, 1.4, 1.4))
    assert loaded.series.volume.shape == (40, 256, 256)
    assert "PixelData" not in loaded.headers[0]


def test_rescale_gives_hounsfield_units(small_phantom: ChestPhantom) -> None:
    loaded = load_series(list(small_phantom.paths))
    volume = loaded.series.volume
    # Outside air is stored as 24 with intercept -1024.
    assert float(np.median(volume[:, :3, :3])) == pytest.approx(-1000, abs=60)
    centre = volume[:, 128, 128]
    assert float(np.median(centre)) == pytest.approx(40, abs=60)


def test_real_tilted_head_ct(head_ct: list[Path]) -> None:
    loaded = load_series(head_ct)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in head_ct]
    iop = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    expected = sorted(
        float(np.dot([float(v) for v in h.ImagePositionPatient], normal)) for h in headers
    )
    got = [
        float(np.dot([float(v) for v in h.ImagePositionPatient], normal)) for h in loaded.headers
    ]
    assert got == pytest.approx(expected)
    assert loaded.series.volume.shape == (len(head_ct), 512, 512)
    assert loaded.series.spacing[0] == pytest.approx(float(np.median(np.diff(expected))))
    assert loaded.series.modality == "CT"


def test_mixed_orientation_is_refused(small_phantom: ChestPhantom, tmp_path: Path) -> None:
    paths = list(small_phantom.paths[:5])
    odd = pydicom.dcmread(paths[0])
    odd.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    odd_path = tmp_path / "odd.dcm"
    odd.save_as(odd_path)
    with pytest.raises(VolumeError, match="different orientation"):
        load_series([*paths[1:], odd_path])


def test_two_slices_at_one_position_are_refused(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    copy = pydicom.dcmread(small_phantom.paths[0])
    copy.SOPInstanceUID = pydicom.uid.generate_uid()
    copy_path = tmp_path / "copy.dcm"
    copy.save_as(copy_path)
    with pytest.raises(VolumeError, match="share a position"):
        load_series([*small_phantom.paths[:3], copy_path])


def test_empty_series_is_refused() -> None:
    with pytest.raises(VolumeError):
        load_series([])
