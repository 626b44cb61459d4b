from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from series_variants import by_z, rewrite, sheared

from infergate.config import VolumeSettings
from infergate.errors import VolumeError
from infergate.inference.volume import load_series
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


def test_an_int16_volume_is_the_rounded_float_volume(
    small_phantom: ChestPhantom, head_ct: list[Path]
) -> None:
    """The int16 volume (CT plugins) is made from whole numbers where the LUT is a
    whole-number shift, and by rounding floats otherwise: the same values either way."""
    for paths in (list(small_phantom.paths), head_ct):
        exact = load_series(paths, volume_type="int16").series.volume
        floats = load_series(paths).series.volume
        assert exact.dtype == np.int16
        np.testing.assert_array_equal(exact, np.rint(floats).astype(np.int16))


def test_int16_values_are_clipped_and_fractional_luts_rounded(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    """Slice 0: a stored value past int16's range after its shift is clipped; slice 1:
    a slope of 0.5 and intercept -1024.5 go through floats, rounded half to even."""
    paths = by_z(small_phantom.paths)[:3]

    def change(index: int, ds: Dataset) -> None:
        pixels = ds.pixel_array.astype(np.uint16)
        if index == 0:
            ds.PixelRepresentation = 0
            ds.BitsStored = ds.BitsAllocated = 16
            ds.HighBit = 15
            pixels[0, 0] = 40000
            ds.RescaleIntercept = 1000
        if index == 1:
            pixels[0, 0], pixels[0, 1] = 2050, 2052
            ds.RescaleSlope, ds.RescaleIntercept = 0.5, -1024.5
        ds.PixelData = pixels.astype(ds.pixel_array.dtype if index else np.uint16).tobytes()

    volume = load_series(rewrite(paths, tmp_path / "luts", change), volume_type="int16")
    values = volume.series.volume
    assert int(values[0, 0, 0]) == 32767  # 40000 + 1000, clipped
    assert (int(values[1, 0, 0]), int(values[1, 0, 1])) == (0, 2)  # 0.5 and 1.5
    assert int(values[2, 0, 0]) == int(load_series(paths).series.volume[2, 0, 0])


def test_real_tilted_head_ct(head_ct: list[Path]) -> None:
    # This scanner writes the tilt into the orientation: the slices lie along the tilted
    # normal, so the stack is regular and nothing is resampled.
    loaded = load_series(head_ct)
    assert loaded.resampled is None
    assert loaded.excluded == ()
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


def test_localizers_and_other_orientations_mixed_in_are_left_out(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    paths = by_z(small_phantom.paths)[:6]

    def mix(index: int, ds: Dataset) -> None:
        if index == 0:
            ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        if index in (1, 2):
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()

    loaded = load_series(rewrite(paths, tmp_path / "mixed", mix))
    assert len(loaded.headers) == 3
    assert loaded.excluded == ("1 localizer (Image Type)", "2 another orientation or image size")
    assert loaded.resampled is None


def test_an_even_mix_of_orientations_is_refused(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    def mix(index: int, ds: Dataset) -> None:
        if index % 2:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]

    with pytest.raises(VolumeError, match="in equal numbers"):
        load_series(rewrite(list(small_phantom.paths[:4]), tmp_path / "even", mix))


def test_a_sheared_stack_is_shifted_back_onto_a_regular_grid(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    straight = load_series(list(small_phantom.paths))
    loaded = load_series(sheared(small_phantom, tmp_path / "tilt"))
    assert loaded.resampled is not None
    assert "sheared by 13.1 degrees (Gantry/Detector Tilt 13.1)" in loaded.resampled
    assert loaded.series.volume.shape == straight.series.volume.shape
    assert loaded.series.spacing == pytest.approx(straight.series.spacing)
    # Rows the shift did not carry out of the field are the untilted phantom's, exactly.
    margin = len(small_phantom.paths)
    inner = slice(margin, 256 - margin)
    np.testing.assert_allclose(
        loaded.series.volume[:, inner], straight.series.volume[:, inner], atol=1e-3
    )
    # A label map on the grid lands on the acquired slices where their pixels are.
    lungs = (loaded.series.volume < -500).astype(np.uint8)
    frames = loaded.source_label_frames(lungs)
    acquired = (
        np.stack(
            [
                pydicom.dcmread(p).pixel_array
                for p in by_z(tuple(tmp_path.joinpath("tilt").glob("*.dcm")))
            ]
        ).astype(np.float32)
        - 1024
    )
    np.testing.assert_array_equal(frames[:, inner], (acquired[:, inner] < -500))


def test_the_tilt_policy_can_refuse_a_sheared_stack(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    with pytest.raises(VolumeError, match=r"sheared by 13\.1 degrees.*volume.tilt is refuse"):
        load_series(sheared(small_phantom, tmp_path / "tilt"), VolumeSettings(tilt="refuse"))


def test_uneven_gaps_are_resampled_or_refused(small_phantom: ChestPhantom, tmp_path: Path) -> None:
    ordered = by_z(small_phantom.paths)
    straight = load_series(ordered)
    # Every third slice missing: gaps of 6 and 12 mm.
    kept = [p for i, p in enumerate(ordered) if i % 3 != 1]
    loaded = load_series(kept)
    assert loaded.resampled is not None
    assert "slice gaps from 6.00 to 12.00 mm" in loaded.resampled
    assert loaded.series.spacing[0] == pytest.approx(6.0)
    assert loaded.series.volume.shape == straight.series.volume.shape
    acquired = [i for i in range(len(ordered)) if i % 3 != 1]
    np.testing.assert_array_equal(loaded.series.volume[acquired], straight.series.volume[acquired])
    # A slice the grid adds is the mean of its two neighbours, 6 mm either side.
    np.testing.assert_allclose(
        loaded.series.volume[1],
        (straight.series.volume[0] + straight.series.volume[2]) / 2,
        atol=1e-3,
    )
    assert [p.index for p in loaded.placements][:3] == pytest.approx([0.0, 2.0, 3.0])
    # The plugin is told which slices are blends: those no acquired slice lies at.
    assert loaded.series.interpolated == tuple(i % 3 == 1 for i in range(len(ordered)))
    assert straight.series.interpolated == ()
    assert loaded.source_label_frames(np.zeros(loaded.series.volume.shape, np.uint8)).shape[0] == (
        len(kept)
    )
    with pytest.raises(VolumeError, match=r"volume\.irregular_spacing is refuse"):
        load_series(kept, VolumeSettings(irregular_spacing="refuse"))


def test_missing_slices_are_refused_whatever_the_policy(small_phantom: ChestPhantom) -> None:
    ordered = by_z(small_phantom.paths)
    with pytest.raises(VolumeError, match=r"slices missing: a gap of 24\.00 mm"):
        load_series([*ordered[:10], *ordered[13:]])


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
