"""Secondary Capture images of a SEG, for a PACS that stores no Segmentation: one per
segmented source slice, the overlay on exactly the segmented pixels, valid for
dciodvfy, readable by DCMTK, the same UIDs every time."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from infergate.config import DeviceSettings
from infergate.errors import ResultEncodingError
from infergate.inference.volume import load_series
from infergate.results.capture import PALETTE, legend_box, secondary_captures
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode
from infergate.testing import ChestPhantom
from infergate_plugins.ct_lung import plugin
from infergate_plugins.ct_lung.plugin import LEFT_LUNG, RIGHT_LUNG
from peers import dciodvfy_errors, require_program

pytestmark = pytest.mark.usefixtures("strict_pydicom")
UID_ROOT = "1.2.826.0.1.3680043.8.498."


def _seg(phantom: ChestPhantom) -> tuple[Dataset, dict[str, Path]]:
    loaded = load_series(list(phantom.paths))
    labels = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    labels[10:20, 100:150, 40:100] = RIGHT_LUNG
    labels[15:25, 100:150, 150:210] = LEFT_LUNG
    findings = plugin.postprocess(loaded.series, {"LUNG_LABELS": labels})
    identity = ResultIdentity("sc-1", UID_ROOT, DeviceSettings(), 9001, 9002)
    seg = encode(loaded, findings, plugin.spec, identity)[0].dataset
    buffer = io.BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    paths = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in phantom.paths
    }
    return pydicom.dcmread(io.BytesIO(buffer.getvalue())), paths


def _masks(seg: Dataset) -> dict[str, npt.NDArray[np.uint8]]:
    """Source SOP Instance UID -> the SEG's segment numbers on its pixels."""
    masks: dict[str, npt.NDArray[np.uint8]] = {}
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frame = seg.pixel_array[index] > 0
        labels = masks.setdefault(str(uid), np.zeros(frame.shape, dtype=np.uint8))
        labels[frame] = number
    return masks


def test_each_segmented_slice_gets_an_image_with_the_overlay_on_its_pixels(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    seg, paths = _seg(small_phantom)

    def lookup(uid: str, frame: int | None) -> tuple[Dataset, int | None] | None:
        return (pydicom.dcmread(paths[uid]), frame) if uid in paths else None

    images = secondary_captures(seg, lookup, UID_ROOT)
    masks = {uid: m for uid, m in _masks(seg).items() if m.any()}
    assert len(images) == len(masks) == 15  # slices 10 to 24
    again = secondary_captures(seg, lookup, UID_ROOT)
    assert [i.SOPInstanceUID for i in again] == [i.SOPInstanceUID for i in images]
    assert len({i.SOPInstanceUID for i in images}) == 15
    names = {str(s.SegmentLabel): int(s.SegmentNumber) for s in seg.SegmentSequence}
    for image in images:
        assert image.StudyInstanceUID == small_phantom.study_uid
        assert image.SeriesNumber == 9004
        assert image.SeriesDescription == "Lung segmentation (AI overlay, not for clinical use)"
        assert (image.BurnedInAnnotation, list(image.ImageType)) == (
            "YES",
            ["DERIVED", "SECONDARY"],
        )
        source_uid = str(image.SourceImageSequence[0].ReferencedSOPInstanceUID)
        labels = masks[source_uid]
        rgb = image.pixel_array.astype(int)
        outside_legend = np.ones(labels.shape, dtype=bool)
        left, top, right, bottom = legend_box(3, labels.shape[1], labels.shape[0])
        outside_legend[top : bottom + 1, left : right + 1] = False
        grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
        # Coloured exactly where a segment is; grey everywhere else.
        assert not grey[(labels > 0) & outside_legend].any()
        assert grey[(labels == 0) & outside_legend].all()
        # Each segment in its own colour: its outline drawn solid.
        for name, number in names.items():
            if (labels == number).any():
                colour = np.asarray(PALETTE[number - 1])
                assert (rgb[labels == number] == colour).all(axis=1).any(), name
    path = tmp_path / "sc.dcm"
    images[0].save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    png = tmp_path / "sc.png"
    converted = subprocess.run(
        [require_program("dcm2pnm"), "+on", str(path), str(png)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert converted.returncode == 0, converted.stderr
    assert png.stat().st_size > 0


def test_a_seg_whose_sources_are_gone_gives_no_images_and_says_why(
    small_phantom: ChestPhantom,
) -> None:
    seg, _ = _seg(small_phantom)
    with pytest.raises(ResultEncodingError, match="no longer on disk"):
        secondary_captures(seg, lambda uid, frame: None, UID_ROOT)
