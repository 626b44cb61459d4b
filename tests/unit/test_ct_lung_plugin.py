from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest

from infergate.inference.volume import load_series
from infergate.plugin_api import ABSENT, LUNG, Series
from infergate.testing import write_head_ct
from infergate_plugins.ct_lung import plugin
from infergate_plugins.ct_lung.plugin import LEFT_LUNG, RIGHT_LUNG


def _series(row_x: float, body_columns: slice = slice(None)) -> Series:
    """10 slices of 40x40 6 mm pixels: a body of soft tissue in ``body_columns``
    (all 40, 240 mm across, unless told), air around it."""
    volume = np.full((10, 40, 40), -1000, dtype=np.int16)  # the plugin's volume_type
    volume[:, :, body_columns] = 40
    return Series(
        modality="CT",
        volume=volume,
        spacing=(10.0, 5.0, 6.0),  # 0.3 mL voxels
        row_direction=(row_x, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
    )


def _labels() -> npt.NDArray[np.uint8]:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:, :, :15] = 1  # 6000 voxels = 1800 mL, small column indices
    labels[:, :30, 25:] = 2  # 4500 voxels = 1350 mL
    return labels


def test_preprocess_sends_int16_hu_and_spacing() -> None:
    inputs = plugin.preprocess(_series(1.0))
    assert inputs["CT_HU"].dtype == np.int16
    assert inputs["CT_HU"].shape == (10, 40, 40)
    assert inputs["SPACING_MM"].tolist() == [10.0, 5.0, 6.0]


def test_laterality_follows_the_row_direction() -> None:
    standard = plugin.postprocess(_series(1.0), {"LUNG_LABELS": _labels()})
    assert {m.segment_number: m.value for m in standard.measurements} == {
        RIGHT_LUNG: pytest.approx(1800.0),
        LEFT_LUNG: pytest.approx(1350.0),
    }
    # Columns running to the patient's right: the same picture is the other way round.
    mirrored = plugin.postprocess(_series(-1.0), {"LUNG_LABELS": _labels()})
    assert {m.segment_number: m.value for m in mirrored.measurements} == {
        LEFT_LUNG: pytest.approx(1800.0),
        RIGHT_LUNG: pytest.approx(1350.0),
    }
    assert standard.label_map is not None
    assert standard.segment_numbers == (RIGHT_LUNG, LEFT_LUNG)


def test_small_air_pockets_are_not_lungs() -> None:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:2, :4, :4] = 1
    findings = plugin.postprocess(_series(1.0), {"LUNG_LABELS": labels})
    assert findings.label_map is None
    assert findings.segment_numbers == ()
    assert findings.measurements == ()
    assert [(e.name, e.value) for e in findings.evaluations] == [(LUNG, ABSENT)]
    assert findings.summary["lungs_found"] == 0


@pytest.mark.parametrize(("row_x", "side"), [(1.0, LEFT_LUNG), (-1.0, RIGHT_LUNG)])
def test_a_single_lung_is_labelled_by_the_side_it_is_on(row_x: float, side: int) -> None:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:, :30, 25:] = 1  # the model's first label, on the high-column side
    findings = plugin.postprocess(_series(row_x), {"LUNG_LABELS": labels})
    assert findings.segment_numbers == (side,)
    assert [m.segment_number for m in findings.measurements] == [side]


def test_two_parts_on_one_side_are_that_lung() -> None:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:, :20, 25:] = 1
    labels[:, 22:, 25:] = 2
    findings = plugin.postprocess(_series(1.0), {"LUNG_LABELS": labels})
    assert findings.segment_numbers == (LEFT_LUNG,)
    assert [m.value for m in findings.measurements] == [pytest.approx(38 * 15 * 10 * 0.3)]


def test_air_on_the_midline_is_not_a_lung() -> None:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:, 5:35, 12:28] = 1  # a skull phantom's air, or a stomach's: centred
    findings = plugin.postprocess(_series(1.0), {"LUNG_LABELS": labels})
    assert findings.segment_numbers == ()
    assert findings.summary["candidate_1_not_a_lung"] == "on the body's midline"
    assert [(e.name, e.value) for e in findings.evaluations] == [(LUNG, ABSENT)]


def test_air_in_a_body_narrower_than_a_thorax_is_not_a_lung() -> None:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:, 5:35, 10:18] = 1  # off-centre, but the body is 150 mm across: a head
    findings = plugin.postprocess(_series(1.0, slice(8, 33)), {"LUNG_LABELS": labels})
    assert findings.segment_numbers == ()
    assert findings.summary["candidate_1_not_a_lung"] == "body too narrow for a thorax"


def test_output_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        plugin.postprocess(_series(1.0), {"LUNG_LABELS": np.zeros((2, 2, 2), np.uint8)})


def test_the_air_of_a_skull_phantom_is_not_a_lung(lung_model: ModuleType, tmp_path: Path) -> None:
    """The review's case: a head phantom's air-filled skull was a 631 mL "Right lung"."""
    head = write_head_ct(tmp_path, air_filled=True)
    series = load_series(list(head.paths)).series
    inputs = plugin.preprocess(series)
    labels = lung_model.segment_lungs(inputs["CT_HU"], inputs["SPACING_MM"].astype(np.float64))
    findings = plugin.postprocess(series, {"LUNG_LABELS": labels})
    seen = findings.summary["candidate_1_ml"]
    assert isinstance(seen, float)
    assert seen > 500  # the model does see lung-sized air
    assert findings.segment_numbers == ()
    assert findings.summary["candidate_1_not_a_lung"] == "body too narrow for a thorax"
