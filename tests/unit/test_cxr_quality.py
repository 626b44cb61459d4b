"""cxr_quality: the checks on synthetic chest radiographs with known defects, the
plugin's findings about each image, and the SR (no SEG) they make."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from infergate.config import DeviceSettings
from infergate.errors import ResultEncodingError
from infergate.inference.volume import load_series
from infergate.plugin_api import LUNG, PRESENT, PRIVATE_SCHEME, Code, Evaluation, Findings
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode, write_result
from infergate.testing import check_plugin, code_problems, write_chest_radiograph
from infergate.work.states import ResultKind
from infergate_plugins.cxr_quality import plugin
from infergate_plugins.cxr_quality.plugin import (
    EXPOSURE_CLIPPING,
    IMAGE_QUALITY,
    INVERTED_GRAYSCALE,
    POSITIONING,
)
from peers import dciodvfy_errors, walk_content


def _check(model: ModuleType, paths: list[Path]) -> Findings:
    series = load_series(paths).series
    outputs: dict[str, npt.NDArray[np.generic]] = model.check_images(
        plugin.preprocess(series)["IMAGE"]
    )
    return plugin.postprocess(series, outputs)


def _verdicts(findings: Findings, image: int = 0) -> dict[Code, str]:
    return {e.name: e.value.meaning for e in findings.evaluations if e.image_index == image}


def test_the_plugin_passes_the_conformance_check() -> None:
    assert check_plugin(plugin) == []


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_a_good_radiograph_meets_the_standard(
    cxr_model: ModuleType, tmp_path: Path, photometric: Any, modality: Any
) -> None:
    radiograph = write_chest_radiograph(tmp_path, photometric=photometric, modality=modality)
    findings = _check(cxr_model, [radiograph.path])
    assert _verdicts(findings) == {
        INVERTED_GRAYSCALE: "Absent",
        POSITIONING: "Absent",
        EXPOSURE_CLIPPING: "Absent",
        IMAGE_QUALITY: "Usable - Meets the quality control standard",
    }
    assert findings.label_map is None
    assert not findings.urgent


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_pixels_stored_against_the_photometric_interpretation_are_inverted(
    cxr_model: ModuleType, tmp_path: Path, photometric: Any
) -> None:
    radiograph = write_chest_radiograph(tmp_path, photometric=photometric, stored_inverted=True)
    verdicts = _verdicts(_check(cxr_model, [radiograph.path]))
    assert verdicts[INVERTED_GRAYSCALE] == "Present"
    # The other checks still see the chest the right way round.
    assert verdicts[POSITIONING] == verdicts[EXPOSURE_CLIPPING] == "Absent"
    assert verdicts[IMAGE_QUALITY] == "Usable - Does not meet the quality control standard"


@pytest.mark.parametrize("rotation", [-0.25, -0.15, 0.05, 0.15, 0.3])
def test_rotation_is_measured_and_judged(
    cxr_model: ModuleType, tmp_path: Path, rotation: float
) -> None:
    radiograph = write_chest_radiograph(tmp_path, rotation=rotation, seed=5)
    findings = _check(cxr_model, [radiograph.path])
    index = {m.name.meaning: m.value for m in findings.measurements}
    assert index["Mediastinal offset (rotation index)"] == pytest.approx(abs(rotation), abs=0.02)
    assert _verdicts(findings)[POSITIONING] == ("Present" if abs(rotation) > 0.1 else "Absent")


@pytest.mark.parametrize(("saturation", "clipped"), [(0.22, True), (0.12, False)])
def test_clipped_lung_fields_are_measured_and_judged(
    cxr_model: ModuleType, tmp_path: Path, saturation: float, clipped: bool
) -> None:
    radiograph = write_chest_radiograph(tmp_path, saturation=saturation)
    findings = _check(cxr_model, [radiograph.path])
    percent = {m.name.meaning: m.value for m in findings.measurements}["Lung field pixels clipped"]
    assert percent == pytest.approx(100 * radiograph.clipped_lung_fraction, abs=2.0)
    assert _verdicts(findings)[EXPOSURE_CLIPPING] == ("Present" if clipped else "Absent")


def test_an_image_without_lung_fields_is_said_so_and_not_rated(
    cxr_model: ModuleType, tmp_path: Path, head_ct: list[Path]
) -> None:
    """A real CT slice presented as a radiograph: no two lung fields, no quality rating."""
    ds = pydicom.dcmread(head_ct[len(head_ct) // 2])
    ds.Modality = "DX"
    ds.ImagerPixelSpacing = ds.PixelSpacing
    path = tmp_path / "not-a-chest.dcm"
    ds.save_as(path)
    verdicts = _verdicts(_check(cxr_model, [path]))
    assert verdicts[LUNG] == "Absent"
    assert IMAGE_QUALITY not in verdicts
    assert POSITIONING not in verdicts


def test_each_image_gets_its_own_findings_and_an_sr_that_references_it(
    cxr_model: ModuleType, tmp_path: Path
) -> None:
    good = write_chest_radiograph(tmp_path / "a", seed=1)
    rotated = write_chest_radiograph(tmp_path / "b", rotation=0.25, seed=2)
    ds = pydicom.dcmread(rotated.path)
    ds.InstanceNumber = 2
    ds.SeriesInstanceUID, ds.StudyInstanceUID = good.series_uid, good.study_uid
    ds.save_as(rotated.path)
    loaded = load_series([good.path, rotated.path])
    findings = _check(cxr_model, [good.path, rotated.path])
    assert _verdicts(findings, 0)[POSITIONING] == "Absent"
    assert _verdicts(findings, 1)[POSITIONING] == "Present"
    identity = ResultIdentity(
        job_id="cxr-1",
        uid_root="1.2.826.0.1.3680043.8.498.",
        device=DeviceSettings(),
        seg_series_number=9001,
        sr_series_number=9002,
    )
    (sr,) = encode(loaded, findings, plugin.spec, identity)
    assert sr.kind is ResultKind.SR
    path = write_result(tmp_path / "out", sr)
    assert dciodvfy_errors(path) == []
    report = pydicom.dcmread(path)
    assert report.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == PRIVATE_SCHEME
    assert code_problems(report) == []
    # One group per image, each referencing its image, with that image's verdicts.
    groups = {}
    for item in walk_content(report.ContentSequence, library=False):
        if item.ValueType != "CONTAINER" or "ContentSequence" not in item:
            continue
        images = {
            child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for child in item.ContentSequence
            if child.ValueType == "IMAGE"
        }
        verdicts = {
            child.ConceptNameCodeSequence[0].CodeMeaning: child.ConceptCodeSequence[0].CodeMeaning
            for child in item.ContentSequence
            if child.ValueType == "CODE"
        }
        if images:
            (image,) = images
            groups[image] = verdicts
    assert groups[good.sop_instance_uid]["Positioning"] == "Absent"
    assert groups[rotated.sop_instance_uid]["Positioning"] == "Present"


def test_a_finding_about_an_image_the_series_lacks_fails_encoding(tmp_path: Path) -> None:
    radiograph = write_chest_radiograph(tmp_path)
    loaded = load_series([radiograph.path])
    findings = Findings(evaluations=(Evaluation(POSITIONING, PRESENT, image_index=3),))
    identity = ResultIdentity("cxr-2", "1.2.826.0.1.3680043.8.498.", DeviceSettings(), 1, 2)
    with pytest.raises(ResultEncodingError, match="image 3 is outside the volume of 1"):
        encode(loaded, findings, plugin.spec, identity)
