"""SEG and SR encoding: strict pydicom, a round trip through bytes, and dciodvfy."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from series_variants import sheared

from infergate.config import DeviceSettings
from infergate.inference.volume import LoadedSeries, load_series
from infergate.plugin_api import MILLILITER, VOLUME, Findings, Measurement
from infergate.results.identity import ResultIdentity
from infergate.results.outline import pixels_per_slice
from infergate.results.writer import DEIDENTIFICATION_UNSTATED, encode, write_result
from infergate.testing import ChestPhantom, code_problems
from infergate.work.states import ResultKind
from infergate_plugins.ct_lung import plugin
from infergate_plugins.ct_lung.plugin import LEFT_LUNG, RIGHT_LUNG
from peers import dciodvfy_errors, walk_content

pytestmark = pytest.mark.usefixtures("strict_pydicom")


def _identity(job_id: str = "job-1") -> ResultIdentity:
    return ResultIdentity(
        job_id=job_id,
        uid_root="1.2.826.0.1.3680043.8.498.",
        device=DeviceSettings(device_serial_number="SN-42"),
        seg_series_number=9001,
        sr_series_number=9002,
    )


def _findings(loaded: LoadedSeries, numbers: tuple[int, ...]) -> Findings:
    label_map = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    z = label_map.shape[0]
    if RIGHT_LUNG in numbers:
        label_map[z // 4 : z // 2, 100:150, 40:100] = RIGHT_LUNG
    if LEFT_LUNG in numbers:
        label_map[z // 3 : 3 * z // 4, 100:150, 150:210] = LEFT_LUNG
    measurements = tuple(
        Measurement(n, VOLUME, float((label_map == n).sum()), MILLILITER) for n in numbers
    )
    return Findings(label_map=label_map, segment_numbers=numbers, measurements=measurements)


def _library(sr: Dataset) -> set[str]:
    """The SOP Instance UIDs the SR's Image Library (TID 1600) lists."""
    (library,) = [
        item
        for item in walk_content(sr.ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
    ]
    return {
        str(entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for entry in walk_content(library.ContentSequence)
        if entry.ValueType == "IMAGE"
    }


def _round_trip(ds: Dataset) -> Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def test_seg_and_sr_are_valid_and_reference_the_source(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    loaded = load_series(list(small_phantom.paths))
    results = encode(loaded, _findings(loaded, (1, 2)), plugin.spec, _identity())
    assert [r.kind for r in results] == [ResultKind.SEG, ResultKind.SR]
    seg, sr = (_round_trip(r.dataset) for r in results)

    assert seg.StudyInstanceUID == sr.StudyInstanceUID == small_phantom.study_uid
    assert seg.SeriesNumber == 9001
    # Which algorithm, about what, and that it is not for clinical use.
    assert seg.SeriesDescription == "Lung segmentation (AI SEG, not for clinical use)"
    assert sr.SeriesDescription == "Lung segmentation (AI SR, not for clinical use)"
    assert sr.SeriesNumber == 9002
    # General Equipment, the same in both.
    for obj in (seg, sr):
        assert obj.DeviceSerialNumber == "SN-42"
        assert obj.ManufacturerModelName == seg.ManufacturerModelName
        assert obj.SoftwareVersions == seg.SoftwareVersions
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    # A lung with its side: the property type Lung, modified by the laterality.
    for segment, side in zip(seg.SegmentSequence, ("Right", "Left"), strict=True):
        (property_type,) = segment.SegmentedPropertyTypeCodeSequence
        assert property_type.CodeMeaning == "Lung"
        assert property_type.SegmentedPropertyTypeModifierCodeSequence[0].CodeMeaning == side
    sites = [
        (
            item.ConceptCodeSequence[0].CodeMeaning,
            item.ContentSequence[0].ConceptCodeSequence[0].CodeMeaning,
        )
        for item in walk_content(sr.ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Finding Site"
    ]
    # Each lung twice: its volume group and its outline on its largest slice.
    assert sites == [("Lung", "Right"), ("Lung", "Left")] * 2
    assert code_problems(seg) == []
    assert code_problems(sr) == []
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct_lung", "1.0.0")
    for obj in (seg, sr):
        equipment = {
            (e.Manufacturer, e.get("SoftwareVersions")) for e in obj.ContributingEquipmentSequence
        }
        assert ("Infergate project", "ct_lung 1.0.0") in equipment

    referenced_segments = [
        (
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID,
            int(item.ReferencedSOPSequence[0].ReferencedSegmentNumber),
        )
        for item in walk_content(sr.ContentSequence)
        if item.ValueType == "IMAGE" and "ReferencedSegmentNumber" in item.ReferencedSOPSequence[0]
    ]
    assert referenced_segments == [(seg.SOPInstanceUID, 1), (seg.SOPInstanceUID, 2)]
    numbers = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in walk_content(sr.ContentSequence)
        if item.ValueType == "NUM" and item.ConceptNameCodeSequence[0].CodeMeaning == "Volume"
    ]
    assert len(numbers) == 2

    for result in results:
        path = write_result(tmp_path, result)
        assert dciodvfy_errors(path) == []


def test_uids_are_derived_from_the_job(small_phantom: ChestPhantom) -> None:
    loaded = load_series(list(small_phantom.paths))
    findings = _findings(loaded, (1,))
    first = [r.sop_instance_uid for r in encode(loaded, findings, plugin.spec, _identity())]
    again = [r.sop_instance_uid for r in encode(loaded, findings, plugin.spec, _identity())]
    other = [r.sop_instance_uid for r in encode(loaded, findings, plugin.spec, _identity("j2"))]
    assert first == again
    assert not set(first) & set(other)


def test_a_series_processed_again_names_the_sr_it_supersedes(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    loaded = load_series(list(small_phantom.paths))
    findings = _findings(loaded, (1, 2))
    first_seg, first_sr = encode(loaded, findings, plugin.spec, _identity("gen-0"))
    identity = dataclasses.replace(_identity("gen-1"), supersedes="gen-0")
    _, second_sr = encode(loaded, findings, plugin.spec, identity)
    assert second_sr.sop_instance_uid != first_sr.sop_instance_uid
    report = _round_trip(second_sr.dataset)
    (study,) = report.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (earlier,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == (
        small_phantom.study_uid,
        first_sr.dataset.SeriesInstanceUID,
    )
    assert earlier.ReferencedSOPInstanceUID == first_sr.sop_instance_uid
    assert earlier.ReferencedSOPClassUID == first_sr.dataset.SOPClassUID
    assert dciodvfy_errors(write_result(tmp_path, second_sr)) == []
    assert "PredecessorDocumentsSequence" not in first_sr.dataset
    assert first_seg.kind is ResultKind.SEG


def test_only_the_left_lung_becomes_segment_one(small_phantom: ChestPhantom) -> None:
    loaded = load_series(list(small_phantom.paths))
    seg, _ = encode(loaded, _findings(loaded, (LEFT_LUNG,)), plugin.spec, _identity())
    segments = seg.dataset.SegmentSequence
    assert [(s.SegmentNumber, s.SegmentLabel) for s in segments] == [(1, "Left lung")]


def test_labels_that_are_no_segment_are_background_in_the_seg(
    small_phantom: ChestPhantom,
) -> None:
    """Segment numbers 1..N need no renumbering, but a label above N (one the plugin
    did not name a segment) is still left out of the SEG, as when renumbered."""
    loaded = load_series(list(small_phantom.paths))
    findings = _findings(loaded, (RIGHT_LUNG,))
    assert findings.label_map is not None
    label_map = findings.label_map.copy()
    label_map[0, :10, :10] = 7  # no segment of the plugin's
    findings = dataclasses.replace(findings, label_map=label_map)
    seg, _ = encode(loaded, findings, plugin.spec, _identity())
    decoded = _round_trip(seg.dataset)
    assert [s.SegmentNumber for s in decoded.SegmentSequence] == [1]
    # Every frame is the right lung's, and the lung's pixels are all that is set.
    frames = decoded.pixel_array.reshape(-1, *label_map.shape[1:])
    assert int(frames.sum()) == int((label_map == RIGHT_LUNG).sum())


def test_findings_without_segments_give_an_sr_alone(small_phantom: ChestPhantom) -> None:
    loaded = load_series(list(small_phantom.paths))
    empty = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    findings = plugin.postprocess(loaded.series, {"LUNG_LABELS": empty})
    results = encode(loaded, findings, plugin.spec, _identity())
    assert [r.kind for r in results] == [ResultKind.SR]
    _round_trip(results[0].dataset)


def test_source_defects_are_not_copied(head_ct: list[Path], tmp_path: Path) -> None:
    """The real head CT lacks Type 2 patient attributes and names no de-identification
    method although it says identity was removed; our SR must still be valid."""
    loaded = load_series(head_ct)
    assert "PatientBirthDate" not in pydicom.dcmread(head_ct[0], stop_before_pixels=True)
    empty = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    findings = plugin.postprocess(loaded.series, {"LUNG_LABELS": empty})
    (sr,) = encode(loaded, findings, plugin.spec, _identity())
    assert sr.dataset.PatientBirthDate == ""
    assert sr.dataset.DeidentificationMethod == DEIDENTIFICATION_UNSTATED
    assert dciodvfy_errors(write_result(tmp_path, sr)) == []


def test_results_of_a_resampled_volume_lie_on_the_acquired_slices(
    small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    paths = sheared(small_phantom, tmp_path / "tilt")
    loaded = load_series(paths)
    assert loaded.resampled is not None
    findings = _findings(loaded, (RIGHT_LUNG,))
    seg, sr = encode(loaded, findings, plugin.spec, _identity())
    assert dciodvfy_errors(write_result(tmp_path / "out", seg)) == []
    assert dciodvfy_errors(write_result(tmp_path / "out", sr)) == []
    acquired = {
        str(ds.SOPInstanceUID): ds
        for ds in (pydicom.dcmread(p, stop_before_pixels=True) for p in paths)
    }
    frames = _round_trip(seg.dataset)
    expected = loaded.source_label_frames(findings.label_map)  # type: ignore[arg-type]
    stored = frames.pixel_array
    for index, item in enumerate(frames.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        original = acquired[str(source.ReferencedSOPInstanceUID)]
        # Each SEG frame sits where its acquired slice is, and holds that slice's labels.
        position = item.PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in position] == pytest.approx(
            [float(v) for v in original.ImagePositionPatient]
        )
        slice_index = [h.SOPInstanceUID for h in loaded.headers].index(
            source.ReferencedSOPInstanceUID
        )
        np.testing.assert_array_equal(stored[index], expected[slice_index] == RIGHT_LUNG)
    # The label map shifted back: the segment moves one row per slice with the tilt.
    rows = [int(np.nonzero(frame.any(axis=1))[0][0]) for frame in expected if frame.any()]
    assert rows == list(range(rows[0], rows[0] - len(rows), -1))


def test_a_series_description_fits_its_64_characters_and_keeps_the_caveat() -> None:
    long = dataclasses.replace(
        plugin.spec, title="A very long account of what this model does " * 3
    )
    description = long.series_description("SEG")
    assert len(description) == 64
    assert description.endswith(" (AI SEG, not for clinical use)")
    cleared = dataclasses.replace(plugin.spec, investigational=False)
    assert cleared.series_description("SR") == "Lung segmentation (AI SR)"


def test_the_results_name_the_model_version_that_ran_and_one_device_per_version(
    small_phantom: ChestPhantom,
) -> None:
    loaded = load_series(list(small_phantom.paths))
    findings = _findings(loaded, (1, 2))
    ran = dataclasses.replace(_identity("job-1"), model_version="3")
    seg, sr = (r.dataset for r in encode(loaded, findings, plugin.spec, ran))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert "triton_model_version=3" in algorithm.AlgorithmParameters
    assert "triton_model=ct_lung_seg" in algorithm.AlgorithmParameters
    # The algorithm as the SR's observer device: one UID per plugin and model version.
    again = dataclasses.replace(_identity("job-2"), model_version="3")
    newer = dataclasses.replace(_identity("job-3"), model_version="4")
    assert ran.device_uid(plugin.spec) == again.device_uid(plugin.spec)
    assert ran.device_uid(plugin.spec) != newer.device_uid(plugin.spec)
    device_uids = [
        item.UID
        for item in walk_content(sr.ContentSequence)
        if item.ValueType == "UIDREF"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer UID"
    ]
    assert device_uids == [ran.device_uid(plugin.spec)]


def test_the_sr_lists_its_images_and_outlines_each_segment_on_its_largest_slice(
    small_phantom: ChestPhantom,
) -> None:
    loaded = load_series(list(small_phantom.paths))
    label_map = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    label_map[10:20, 100:150, 40:100] = RIGHT_LUNG
    label_map[14, 90:160, 30:110] = RIGHT_LUNG  # slice 14: the largest
    label_map[14, 10:20, 10:20] = RIGHT_LUNG  # a small island there, not outlined
    findings = Findings(
        label_map=label_map,
        segment_numbers=(RIGHT_LUNG,),
        measurements=(Measurement(RIGHT_LUNG, VOLUME, 1.0, MILLILITER),),
    )
    _, sr = (_round_trip(r.dataset) for r in encode(loaded, findings, plugin.spec, _identity()))

    # The library describes the image the content shows by itself: the outlined slice.
    # The segment's volume group references the source series, the SEG each frame.
    assert _library(sr) == {str(loaded.headers[14].SOPInstanceUID)}
    (source_series,) = [
        item
        for item in walk_content(sr.ContentSequence)
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Source Series for Segmentation"
    ]
    assert loaded.headers[0].SeriesInstanceUID == source_series.UID

    (scoord,) = [item for item in walk_content(sr.ContentSequence) if item.ValueType == "SCOORD"]
    assert scoord.GraphicType == "POLYLINE"
    points = np.asarray(scoord.GraphicData, dtype=float).reshape(-1, 2)
    assert (points[0] == points[-1]).all()  # closed
    # Column then row, pixel edges: the region's 80 columns and 70 rows exactly.
    assert (points[:, 0].min(), points[:, 0].max()) == (30.0, 110.0)
    assert (points[:, 1].min(), points[:, 1].max()) == (90.0, 160.0)
    (image,) = scoord.ContentSequence
    assert (
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == loaded.headers[14].SOPInstanceUID
    )


def test_an_image_the_library_cannot_describe_is_left_out_of_it_not_the_report(
    small_phantom: ChestPhantom,
) -> None:
    loaded = load_series(list(small_phantom.paths))
    del loaded.headers[3].SliceThickness  # Type 2: a scanner may leave it out
    label_map = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
    label_map[3, 100:150, 40:100] = RIGHT_LUNG  # outlined on slice 3, in the library
    label_map[5, 100:150, 40:90] = RIGHT_LUNG
    findings = Findings(label_map=label_map, segment_numbers=(RIGHT_LUNG,))
    _, sr = (_round_trip(r.dataset) for r in encode(loaded, findings, plugin.spec, _identity()))
    assert "Image Library" not in {
        item.ConceptNameCodeSequence[0].CodeMeaning for item in walk_content(sr.ContentSequence)
    }
    (scoord,) = [item for item in walk_content(sr.ContentSequence) if item.ValueType == "SCOORD"]
    assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == str(
        loaded.headers[3].SOPInstanceUID
    )
    evidence = {
        item.ReferencedSOPInstanceUID
        for series in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert str(loaded.headers[3].SOPInstanceUID) in evidence


def test_pixels_per_slice_counts_each_label_in_each_slice() -> None:
    rng = np.random.default_rng(7)
    label_map = rng.integers(0, 4, size=(9, 17, 23), dtype=np.uint8)
    label_map[4] = 0  # a slice without any
    counts = pixels_per_slice(label_map, [1, 3])
    assert sorted(counts) == [1, 3]
    for number, per_slice in counts.items():
        np.testing.assert_array_equal(per_slice, (label_map == number).sum(axis=(1, 2)))
    assert counts[1][4] == counts[3][4] == 0
