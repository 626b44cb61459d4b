"""Multi-frame Enhanced images: frames read as slices whatever their frame order, and
results that refer to the one source instance by frame number."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np
import pydicom
import pytest

from infergate.config import DeviceSettings
from infergate.errors import VolumeError
from infergate.inference.volume import load_series
from infergate.plugins import LoadedPlugin
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode, write_result
from infergate.routing.decide import route
from infergate.routing.facts import series_facts
from infergate.testing import ChestPhantom
from infergate.testing.multiframe import write_multiframe_ct
from infergate_plugins.ct_lung import plugin
from peers import dciodvfy_errors, walk_content


@pytest.fixture(scope="module")
def multiframe(small_phantom: ChestPhantom, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_multiframe_ct(
        list(small_phantom.paths), tmp_path_factory.mktemp("multiframe") / "ct.dcm"
    )


def test_frames_make_the_same_volume_as_the_single_frame_slices(
    multiframe: Path, small_phantom: ChestPhantom
) -> None:
    single = load_series(list(small_phantom.paths))
    multi = load_series([multiframe])
    np.testing.assert_array_equal(multi.series.volume, single.series.volume)
    assert multi.series.spacing == pytest.approx(single.series.spacing)
    assert multi.series.origin == pytest.approx(single.series.origin)
    # The frames were stored shuffled: slice order is not frame order.
    assert sorted(f for f in multi.frames if f is not None) == list(range(1, 41))
    assert list(multi.frames) != sorted(f for f in multi.frames if f is not None)
    uids = {str(h.SOPInstanceUID) for h in multi.headers}
    assert len(uids) == 1


def test_seg_and_sr_of_a_multiframe_source_refer_to_its_frames(
    multiframe: Path, lung_model: ModuleType, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    loaded = load_series([multiframe])
    inputs = plugin.preprocess(loaded.series)
    labels = lung_model.segment_lungs(inputs["CT_HU"], inputs["SPACING_MM"].astype(np.float64))
    findings = plugin.postprocess(loaded.series, {"LUNG_LABELS": labels})
    volumes = {m.segment_number: m.value for m in findings.measurements}
    assert volumes[1] == pytest.approx(small_phantom.right_lung_ml, rel=0.03)
    identity = ResultIdentity("mf-1", "1.2.826.0.1.3680043.8.498.", DeviceSettings(), 9001, 9002)
    seg, sr = encode(loaded, findings, plugin.spec, identity)
    seg_path = write_result(tmp_path, seg)
    sr_path = write_result(tmp_path, sr)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []

    source = pydicom.dcmread(multiframe)
    position_of_frame = {
        number: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for number, item in enumerate(source.PerFrameFunctionalGroupsSequence, start=1)
    }
    written = pydicom.dcmread(seg_path)
    (series,) = written.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence] == [
        source.SOPInstanceUID
    ]
    # Each SEG frame lies where the source frame it derives from lies.
    for item in written.PerFrameFunctionalGroupsSequence:
        derived = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert derived.ReferencedSOPInstanceUID == source.SOPInstanceUID
        frame = int(derived.ReferencedFrameNumber)
        seg_position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert seg_position == pytest.approx(position_of_frame[frame])
    # The SR cites the frames each lung covers, in the one source instance.
    report = pydicom.dcmread(sr_path)
    cited = [
        item.ReferencedSOPSequence[0]
        for item in walk_content(report.ContentSequence, library=False)
        if item.ValueType == "IMAGE"
        and item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID != written.SOPInstanceUID
    ]
    assert cited
    # The Image Library describes the instance from its functional groups.
    spacing = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in walk_content(report.ContentSequence)
        if item.ValueType == "NUM"
        and item.ConceptNameCodeSequence[0].CodeMeaning == "Horizontal Pixel Spacing"
    ]
    shared = source.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert spacing == [float(shared.PixelSpacing[1])]
    assert {c.ReferencedSOPInstanceUID for c in cited} == {source.SOPInstanceUID}
    assert all("ReferencedFrameNumber" in c for c in cited)


def test_a_multiframe_image_without_functional_groups_is_refused(
    multiframe: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(multiframe)
    del ds.PerFrameFunctionalGroupsSequence
    path = tmp_path / "plain-multiframe.dcm"
    ds.save_as(path)
    with pytest.raises(VolumeError, match="40 frames but no per-frame functional groups"):
        load_series([path])


def test_two_multiframe_instances_in_one_series_are_refused(
    multiframe: Path, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(multiframe)
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    for item in ds.PerFrameFunctionalGroupsSequence:  # a second stack, further along
        position = item.PlanePositionSequence[0].ImagePositionPatient
        position[2] = float(position[2]) + 1000.0
    second = tmp_path / "second.dcm"
    ds.save_as(second)
    with pytest.raises(VolumeError, match="one multi-frame instance per series"):
        load_series([multiframe, second])


def test_a_frame_without_a_position_is_named(multiframe: Path, tmp_path: Path) -> None:
    ds = pydicom.dcmread(multiframe)
    del ds.PerFrameFunctionalGroupsSequence[6].PlanePositionSequence
    path = tmp_path / "gap.dcm"
    ds.save_as(path)
    with pytest.raises(VolumeError, match="frame 7 has no Plane Orientation or Plane Position"):
        load_series([path])


def test_routing_sees_a_multiframe_series_plane_from_its_functional_groups(
    multiframe: Path,
) -> None:
    header = pydicom.dcmread(multiframe, stop_before_pixels=True)
    assert "ImageOrientationPatient" not in header
    facts = series_facts([header])
    assert facts.orientation == "axial"
    [decision] = route(facts, [LoadedPlugin(plugin, "test")])
    assert decision.matched  # ct_lung: acquired axial chest CT (by its description)
