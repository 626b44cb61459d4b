"""Every plugin's SEG and SR, from its own model on its phantom, written with strict
pydicom (highdicom's habit: an invalid value raises), read back as bytes by
highdicom's own readers, clean for dciodvfy, and every code right by the
dictionaries; the Secondary Capture images of each SEG as well."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from infergate.config import DeviceSettings
from infergate.inference.volume import load_series
from infergate.plugin_api import Plugin
from infergate.results.capture import secondary_captures
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode, write_result
from infergate.testing import ChestPhantom, HeadPhantom, code_problems, write_chest_radiograph
from infergate.work.states import ResultKind
from infergate_plugins.ct_head_bleed import plugin as ct_head_bleed
from infergate_plugins.ct_lung import plugin as ct_lung
from infergate_plugins.cxr_quality import plugin as cxr_quality
from peers import dciodvfy_errors

pytestmark = pytest.mark.usefixtures("strict_pydicom")
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def _outputs(
    name: str, model: ModuleType, inputs: dict[str, npt.NDArray[np.generic]]
) -> dict[str, npt.NDArray[np.generic]]:
    if name == "ct_lung":
        spacing = inputs["SPACING_MM"].astype(np.float64)
        return {"LUNG_LABELS": model.segment_lungs(inputs["CT_HU"], spacing)}
    if name == "ct_head_bleed":
        spacing = inputs["SPACING_MM"].astype(np.float64)
        return {"CANDIDATE_LABELS": model.find_candidates(inputs["CT_HU"], spacing)}
    outputs: dict[str, npt.NDArray[np.generic]] = model.check_images(inputs["IMAGE"])
    return outputs


def _lookup(paths: list[Path]) -> Callable[[str, int | None], tuple[Dataset, int | None] | None]:
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in paths}

    def lookup(uid: str, frame: int | None) -> tuple[Dataset, int | None] | None:
        return (pydicom.dcmread(by_uid[uid]), frame) if uid in by_uid else None

    return lookup


@pytest.mark.parametrize("name", ["ct_lung", "ct_head_bleed", "cxr_quality"])
def test_every_plugins_results_round_trip_through_highdicom(  # noqa: PLR0917 - fixtures
    name: str,
    small_phantom: ChestPhantom,
    bleed_head: HeadPhantom,
    lung_model: ModuleType,
    bleed_model: ModuleType,
    cxr_model: ModuleType,
    tmp_path: Path,
) -> None:
    plugin: Plugin
    if name == "ct_lung":
        plugin, model, paths = ct_lung, lung_model, list(small_phantom.paths)
    elif name == "ct_head_bleed":
        plugin, model, paths = ct_head_bleed, bleed_model, list(bleed_head.paths)
    else:
        plugin, model = cxr_quality, cxr_model
        paths = [write_chest_radiograph(tmp_path / "cxr").path]
    loaded = load_series(paths)
    findings = plugin.postprocess(
        loaded.series, _outputs(name, model, plugin.preprocess(loaded.series))
    )
    identity = ResultIdentity(f"{name}-1", UID_ROOT, DeviceSettings(), 9001, 9002)
    results = encode(loaded, findings, plugin.spec, identity)
    assert [r.kind for r in results] == (
        [ResultKind.SR] if name == "cxr_quality" else [ResultKind.SEG, ResultKind.SR]
    )
    for result in results:
        path = write_result(tmp_path / "out", result)
        assert dciodvfy_errors(path) == []
        read = pydicom.dcmread(path)
        assert code_problems(read) == []
        if result.kind is ResultKind.SEG:
            seg = hd.seg.segread(path)
            assert seg.number_of_segments == len(findings.segment_numbers)
            images = secondary_captures(read, _lookup(paths), UID_ROOT)
            assert images
            for number, image in enumerate(images[:3]):
                sc_path = tmp_path / f"sc-{number}.dcm"
                image.save_as(sc_path, enforce_file_format=True)
                assert dciodvfy_errors(sc_path) == []
                assert code_problems(pydicom.dcmread(sc_path)) == []
        else:
            report = hd.sr.srread(path)
            assert isinstance(report, hd.sr.Comprehensive3DSR)
            content: hd.sr.MeasurementReport = report.content  # type: ignore[assignment]
            assert content.get_observer_contexts()
            segments = len(findings.segment_numbers)
            # Per segment: its volume group and its outline on its largest slice.
            assert len(content.get_volumetric_roi_measurement_groups()) == segments
            assert len(content.get_planar_roi_measurement_groups()) == segments
            if not segments:
                assert content.get_image_measurement_groups()
