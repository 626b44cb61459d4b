from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from infergate.plugin_api import ABSENT, LUNG, Series
from infergate_plugins.ct_lung import plugin
from infergate_plugins.ct_lung.plugin import LEFT_LUNG, RIGHT_LUNG


def _series(row_x: float) -> Series:
    return Series(
        modality="CT",
        volume=np.full((10, 40, 40), -1000.0, dtype=np.float32),
        spacing=(10.0, 5.0, 5.0),  # 0.25 mL voxels
        row_direction=(row_x, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
    )


def _labels() -> npt.NDArray[np.uint8]:
    labels = np.zeros((10, 40, 40), dtype=np.uint8)
    labels[:, :, :15] = 1  # 6000 voxels = 1500 mL, small column indices
    labels[:, :30, 25:] = 2  # 4500 voxels = 1125 mL
    return labels


def test_preprocess_sends_int16_hu_and_spacing() -> None:
    inputs = plugin.preprocess(_series(1.0))
    assert inputs["CT_HU"].dtype == np.int16
    assert inputs["CT_HU"].shape == (10, 40, 40)
    assert inputs["SPACING_MM"].tolist() == [10.0, 5.0, 5.0]


def test_laterality_follows_the_row_direction() -> None:
    standard = plugin.postprocess(_series(1.0), {"LUNG_LABELS": _labels()})
    assert {m.segment_number: m.value for m in standard.measurements} == {
        RIGHT_LUNG: pytest.approx(1500.0),
        LEFT_LUNG: pytest.approx(1125.0),
    }
    # Columns running to the patient's right: the same picture is the other way round.
    mirrored = plugin.postprocess(_series(-1.0), {"LUNG_LABELS": _labels()})
    assert {m.segment_number: m.value for m in mirrored.measurements} == {
        LEFT_LUNG: pytest.approx(1500.0),
        RIGHT_LUNG: pytest.approx(1125.0),
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


def test_output_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        plugin.postprocess(_series(1.0), {"LUNG_LABELS": np.zeros((2, 2, 2), np.uint8)})
