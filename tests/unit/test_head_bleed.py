"""ct_head_bleed: the model on synthetic heads with known hyperdensities and on the real
head CT (as it is, and with a hyperdensity inserted into its real brain), the plugin's
findings, and the SEG and SR they make."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from infergate.config import DeviceSettings
from infergate.inference.volume import load_series
from infergate.plugin_api import HEMORRHAGE, LEFT, RIGHT, Series
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode, write_result
from infergate.testing import HeadPhantom, check_plugin, code_problems, write_head_ct
from infergate_plugins.ct_head_bleed import plugin
from peers import dciodvfy_errors, walk_content


def _infer(model: ModuleType, series: Series) -> dict[str, npt.NDArray[np.generic]]:
    inputs = plugin.preprocess(series)
    labels = model.find_candidates(inputs["CT_HU"], inputs["SPACING_MM"].astype(np.float64))
    return {"CANDIDATE_LABELS": labels}


def test_the_plugin_passes_the_conformance_check() -> None:
    assert check_plugin(plugin) == []


def test_inserted_hyperdensities_are_found_with_their_volume_and_side(
    bleed_model: ModuleType, bleed_head: HeadPhantom
) -> None:
    series = load_series(list(bleed_head.paths)).series
    findings = plugin.postprocess(series, _infer(bleed_model, series))
    right_ml, left_ml = bleed_head.hyperdensity_ml
    # Largest first: the right parietal one is candidate 1.
    volumes = {m.segment_number: m.value for m in findings.measurements}
    assert volumes == {1: pytest.approx(right_ml, rel=0.1), 2: pytest.approx(left_ml, rel=0.1)}
    sides = {e.segment_number: e.value for e in findings.evaluations if e.segment_number}
    assert sides == {1: RIGHT, 2: LEFT}
    assert (HEMORRHAGE, "Present") in {(e.name, e.value.meaning) for e in findings.evaluations}
    assert findings.urgent
    assert findings.label_map is not None
    assert findings.segment_numbers == (1, 2)


def test_a_head_without_hyperdensity_is_absent_and_not_urgent(
    bleed_model: ModuleType, tmp_path: Path
) -> None:
    head = write_head_ct(tmp_path / "clean", seed=3)
    series = load_series(list(head.paths)).series
    findings = plugin.postprocess(series, _infer(bleed_model, series))
    assert findings.label_map is None
    assert [(e.name, e.value.meaning) for e in findings.evaluations] == [(HEMORRHAGE, "Absent")]
    assert not findings.urgent


def _blended(interpolated: tuple[bool, ...]) -> Series:
    """A 12-slice head-like volume resampled across uneven gaps: ``interpolated``
    says which slices no acquired slice lies at."""
    volume = np.full((12, 64, 64), -1000.0, dtype=np.float32)
    volume[:, 8:56, 8:56] = 35.0
    return Series(
        modality="CT",
        volume=volume,
        spacing=(1.0, 1.0, 1.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        origin=(0.0, 0.0, 0.0),
        interpolated=interpolated,
    )


def test_a_candidate_only_in_interpolated_slices_raises_no_finding() -> None:
    """The review's case: resampling a head CT with 1 to 7 mm gaps made bright
    partial-volume spots near the vertex, three "Present" candidates, urgent."""
    gaps = tuple(i in (4, 5, 6, 7, 8) for i in range(12))  # a wide gap, blended
    labels = np.zeros((12, 64, 64), dtype=np.uint8)
    labels[5:8, 20:26, 20:26] = 1  # only in the blended slices
    findings = plugin.postprocess(_blended(gaps), {"CANDIDATE_LABELS": labels})
    assert [(e.name, e.value.meaning) for e in findings.evaluations] == [(HEMORRHAGE, "Absent")]
    assert not findings.urgent
    assert findings.summary == {"candidates": 0, "interpolated_only": 1}
    # One that an acquired slice shows as well is a finding, and the blended one is not.
    labels[2:5, 40:46, 40:46] = 2
    findings = plugin.postprocess(_blended(gaps), {"CANDIDATE_LABELS": labels})
    assert findings.segment_numbers == (2,)
    assert findings.urgent
    assert findings.label_map is not None
    assert set(np.unique(findings.label_map)) == {0, 2}
    assert findings.summary["interpolated_only"] == 1
    # Every slice acquired: the same candidate is a finding.
    labels[2:5] = 0
    findings = plugin.postprocess(_blended(()), {"CANDIDATE_LABELS": labels})
    assert findings.segment_numbers == (1,)


def test_the_real_head_ct_has_no_candidate(bleed_model: ModuleType, head_ct: list[Path]) -> None:
    """One real, normal head CT (thick slices, skull base, vertex): no false candidate."""
    series = load_series(head_ct).series
    assert _infer(bleed_model, series)["CANDIDATE_LABELS"].max() == 0


@pytest.mark.parametrize(
    ("centre", "side"),
    [((18, 230, 170), RIGHT), ((16, 300, 330), LEFT)],
    ids=["right-deep", "left-posterior"],
)
def test_a_hyperdensity_inserted_into_the_real_brain_is_found(
    bleed_model: ModuleType,
    head_ct: list[Path],
    centre: tuple[int, int, int],
    side: object,
) -> None:
    """Blood density (68 HU) with the real brain's own texture, in an ellipsoid of ~3 mL."""
    loaded = load_series(head_ct)
    series = loaded.series
    dz, dy, dx = series.spacing
    z, r, c = np.meshgrid(
        *(np.arange(n) * d for n, d in zip(series.volume.shape, (dz, dy, dx), strict=True)),
        indexing="ij",
    )
    blob = (
        ((z - centre[0] * dz) / 8.0) ** 2
        + ((r - centre[1] * dy) / 10.0) ** 2
        + ((c - centre[2] * dx) / 9.0) ** 2
    ) <= 1.0
    volume = series.volume.copy()
    volume[blob] = 68.0 + (volume[blob] - volume[blob].mean())
    changed = Series(
        series.modality,
        volume,
        series.spacing,
        series.row_direction,
        series.column_direction,
        series.origin,
    )
    findings = plugin.postprocess(changed, _infer(bleed_model, changed))
    truth_ml = float(blob.sum()) * series.voxel_volume_ml
    (measurement,) = findings.measurements
    assert measurement.value == pytest.approx(truth_ml, rel=0.15)
    sides = [e.value for e in findings.evaluations if e.segment_number == 1]
    assert sides == [side]


def test_seg_and_sr_of_a_bleed_are_valid(
    bleed_model: ModuleType, bleed_head: HeadPhantom, tmp_path: Path
) -> None:
    loaded = load_series(list(bleed_head.paths))
    findings = plugin.postprocess(loaded.series, _infer(bleed_model, loaded.series))
    identity = ResultIdentity(
        job_id="bleed-1",
        uid_root="1.2.826.0.1.3680043.8.498.",
        device=DeviceSettings(),
        seg_series_number=9001,
        sr_series_number=9002,
    )
    seg, sr = encode(loaded, findings, plugin.spec, identity)
    seg_path = write_result(tmp_path / "out", seg)
    sr_path = write_result(tmp_path / "out", sr)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    segments = pydicom.dcmread(seg_path).SegmentSequence
    assert [s.SegmentLabel for s in segments] == [
        "Hyperdense candidate 1",
        "Hyperdense candidate 2",
    ]
    # A hemorrhage is a morphologically abnormal structure, in the brain.
    for segment in segments:
        assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert segment.SegmentedPropertyTypeCodeSequence[0].CodeMeaning == "Hemorrhage"
        assert segment.AnatomicRegionSequence[0].CodeMeaning == "Brain"
    for path in (seg_path, sr_path):
        assert code_problems(pydicom.dcmread(path)) == []
    content = list(walk_content(pydicom.dcmread(sr_path).ContentSequence))
    codes = {
        (i.ConceptNameCodeSequence[0].CodeMeaning, i.ConceptCodeSequence[0].CodeMeaning)
        for i in content
        if i.ValueType == "CODE"
    }
    assert ("Hemorrhage", "Present") in codes
    assert ("Finding Site", "Brain") in codes
    assert ("Laterality", "Right") in codes
    assert ("Laterality", "Left") in codes
