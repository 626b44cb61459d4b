"""Projection images (CR, DX) as a plugin gets them: values as displayed, spacing and
directions from their own headers, several images in Instance Number order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from infergate.errors import VolumeError
from infergate.inference.volume import load_series
from infergate.routing.facts import read_series_facts
from infergate.routing.rules import Condition, evaluate
from infergate.testing.radiograph_phantom import write_chest_radiograph


def test_monochrome1_and_monochrome2_of_one_image_give_the_same_values(tmp_path: Path) -> None:
    two = write_chest_radiograph(tmp_path / "m2", photometric="MONOCHROME2")
    one = write_chest_radiograph(tmp_path / "m1", photometric="MONOCHROME1")
    stored_one = pydicom.dcmread(one.path).pixel_array
    stored_two = pydicom.dcmread(two.path).pixel_array
    assert not np.array_equal(stored_one, stored_two)  # stored the other way round
    shown_one = load_series([one.path]).series.volume
    shown_two = load_series([two.path]).series.volume
    np.testing.assert_array_equal(shown_one, shown_two)
    # Brighter is higher: the spine (middle column) above the lungs either way.
    middle = shown_one[0, 200, 256]
    lung = shown_one[0, 200, 128]
    assert middle > lung


def test_monochrome1_is_mirrored_within_the_rescaled_range(tmp_path: Path) -> None:
    radiograph = write_chest_radiograph(tmp_path, photometric="MONOCHROME1")
    ds = pydicom.dcmread(radiograph.path)
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    ds.save_as(radiograph.path)
    shown = load_series([radiograph.path]).series.volume[0]
    stored = ds.pixel_array.astype(np.float64)
    # Stored 0..4095 rescales to -100..8090; the mirror of v is 7990 - v.
    np.testing.assert_allclose(shown, (-100 + 8090) - (stored * 2 - 100))


def test_spacing_and_directions_come_from_the_image(tmp_path: Path) -> None:
    lateral = write_chest_radiograph(tmp_path, patient_orientation=("A", "FR"), pixel_spacing=0.2)
    loaded = load_series([lateral.path])
    series = loaded.series
    assert series.projection
    assert series.spacing == (0.0, 0.2, 0.2)
    assert series.row_direction == (0.0, -1.0, 0.0)
    assert series.column_direction == pytest.approx((-(0.5**0.5), 0.0, -(0.5**0.5)))
    assert loaded.assumed == ()
    ds = pydicom.dcmread(lateral.path)
    ds.PixelSpacing = [0.18, 0.19]  # calibrated in the patient: preferred to the detector's
    ds.save_as(lateral.path)
    assert load_series([lateral.path]).series.spacing == (0.0, 0.18, 0.19)


def test_an_image_without_patient_orientation_says_what_was_assumed(tmp_path: Path) -> None:
    radiograph = write_chest_radiograph(tmp_path, patient_orientation=None)
    loaded = load_series([radiograph.path])
    assert loaded.series.row_direction == (1.0, 0.0, 0.0)
    assert loaded.series.column_direction == (0.0, 0.0, -1.0)
    (assumed,) = loaded.assumed
    assert "no Patient Orientation" in assumed


def test_an_image_without_any_pixel_spacing_is_refused(tmp_path: Path) -> None:
    radiograph = write_chest_radiograph(tmp_path)
    ds = pydicom.dcmread(radiograph.path)
    del ds.ImagerPixelSpacing
    ds.save_as(radiograph.path)
    with pytest.raises(VolumeError, match="neither Pixel Spacing nor Imager Pixel Spacing"):
        load_series([radiograph.path])


def test_images_of_a_series_are_in_instance_number_order(tmp_path: Path) -> None:
    """Three images of one series: stacked by Instance Number, one of another size left out."""
    paths = []
    for number, (rows, rotation) in enumerate(((512, 0.2), (512, 0.0), (400, 0.0)), start=1):
        radiograph = write_chest_radiograph(
            tmp_path / str(number), rows=rows, rotation=rotation, seed=number
        )
        ds = pydicom.dcmread(radiograph.path)
        ds.InstanceNumber = 4 - number  # the rotated one last
        ds.save_as(radiograph.path)
        paths.append(radiograph.path)
    loaded = load_series(paths)
    assert loaded.series.volume.shape == (2, 512, 512)
    assert [int(h.InstanceNumber) for h in loaded.headers] == [2, 3]
    assert loaded.excluded == ("1 another orientation or image size",)
    assert loaded.acquired_at(1) == (1,)


def test_routing_sees_a_radiograph_as_a_projection(tmp_path: Path) -> None:
    radiograph = write_chest_radiograph(tmp_path, modality="CR")
    facts = read_series_facts([radiograph.path])
    assert (facts.modality, facts.orientation, facts.body_part) == ("CR", "projection", "CHEST")
    assert evaluate(Condition.model_validate({"orientation": ["projection"]}), facts).matched
