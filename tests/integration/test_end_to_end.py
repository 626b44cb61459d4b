"""A CT study in over DICOM, lungs segmented on the embedded Triton, SEG and SR in Orthanc.

Real peers only: DCMTK's storescu sends, Infergate runs as its own process with its
embedded tritonserver, Orthanc is the PACS, dciodvfy checks what arrived.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset

from infergate.plugin_api import LATERALITY as LATERALITY_CODE
from infergate.testing import ChestPhantom, HeadPhantom, code_problems, write_chest_radiograph
from infergate.testing.multiframe import write_multiframe_ct
from infergate.testing.phantoms import LEFT_LUNG_LABEL, RIGHT_LUNG_LABEL
from peers import (
    REPO,
    InfergateProcess,
    Orthanc,
    dciodvfy_errors,
    infergate_config,
    json_events,
    run_cli,
    storescu,
    wait_until,
    walk_content,
)

pytestmark = pytest.mark.integration

VOLUME = "118565006"
FINDING_SITE = "363698007"
LATERALITY = LATERALITY_CODE.value


@pytest.fixture
def infergate(tmp_path: Path, orthanc: Orthanc) -> Iterator[InfergateProcess]:
    server = InfergateProcess(tmp_path / "infergate", infergate_config(tmp_path / "var", orthanc))
    server.workdir.mkdir()
    yield server
    server.stop()


def _fetch(orthanc: Orthanc, study_uid: str, modality: str, folder: Path) -> list[Path]:
    paths = []
    for index, orthanc_id in enumerate(orthanc.find_instances(study_uid, modality)):
        path = folder / f"{modality.lower()}-{index}.dcm"
        path.write_bytes(orthanc.instance_file(orthanc_id))
        paths.append(path)
    return paths


def _sr_volumes(sr: Dataset) -> dict[str, float]:
    """Finding site -> Volume (mL), from each measurement group of a TID 1500 SR; a
    site with a laterality as "Right lung"."""
    volumes: dict[str, float] = {}
    for item in walk_content(sr.ContentSequence, library=False):
        if item.ValueType != "CONTAINER" or "ContentSequence" not in item:
            continue
        site = volume = None
        for child in item.ContentSequence:
            code = child.ConceptNameCodeSequence[0].CodeValue
            if child.ValueType == "CODE" and code == FINDING_SITE:
                site = child.ConceptCodeSequence[0].CodeMeaning
                sides = [
                    modifier.ConceptCodeSequence[0].CodeMeaning
                    for modifier in child.get("ContentSequence", [])
                    if modifier.ConceptNameCodeSequence[0].CodeValue == LATERALITY
                ]
                if sides:
                    site = f"{sides[0]} {site.lower()}"
            if child.ValueType == "NUM" and code == VOLUME:
                volume = float(child.MeasuredValueSequence[0].NumericValue)
        if site is not None and volume is not None:
            volumes[site] = volume
    return volumes


def _sr_groups(sr: Dataset) -> list[dict[str, object]]:
    """Each container of an SR as {concept name meaning: value}: text, number, code
    meaning, and the referenced instance of an image item under "image"."""
    groups = []
    for item in walk_content(sr.ContentSequence, library=False):
        if item.ValueType != "CONTAINER" or "ContentSequence" not in item:
            continue
        group: dict[str, object] = {}
        for child in item.ContentSequence:
            name = child.ConceptNameCodeSequence[0].CodeMeaning
            if child.ValueType == "TEXT":
                group[name] = child.TextValue
            if child.ValueType == "NUM":
                group[name] = float(child.MeasuredValueSequence[0].NumericValue)
            if child.ValueType == "CODE":
                group[name] = child.ConceptCodeSequence[0].CodeMeaning
            if child.ValueType == "IMAGE":
                group["image"] = child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        groups.append(group)
    return groups


def _wait_sent_kinds(server: InfergateProcess, count: int, timeout: float = 120) -> list[str]:
    """The kinds of the objects sent, once ``count`` were: jobs of one study that finish
    together send their results in one association, others in one each."""

    def kinds() -> list[str]:
        return [k for e in server.events() if e["event"] == "export.sent" for k in e["kinds"]]

    wait_until(lambda: len(kinds()) >= count, timeout, f"{count} objects sent")
    return kinds()


def _assert_no_phi(server: InfergateProcess, identity: Any) -> None:
    text = server.log_text()
    for value in (
        identity.patient_name,
        identity.patient_id,
        identity.patient_birth_date,
        identity.accession_number,
        "PHANTOM^LUNGS",
        "REFERRER^PHI",
    ):
        assert value not in text, f"patient data {value!r} appeared in the log"


def test_phantom_study_gets_seg_and_sr_in_the_same_study(
    infergate: InfergateProcess, orthanc: Orthanc, chest_phantom: ChestPhantom, tmp_path: Path
) -> None:
    infergate.start()
    storescu(infergate.port, list(chest_phantom.paths))
    infergate.wait_event("export.sent", timeout=180)

    segs = _fetch(orthanc, chest_phantom.study_uid, "SEG", tmp_path)
    srs = _fetch(orthanc, chest_phantom.study_uid, "SR", tmp_path)
    assert len(segs) == 1
    assert len(srs) == 1
    seg = pydicom.dcmread(segs[0])
    sr = pydicom.dcmread(srs[0])
    assert seg.StudyInstanceUID == sr.StudyInstanceUID == chest_phantom.study_uid

    # The SEG references exactly the source instances, frame by frame.
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == set(chest_phantom.sop_instance_uids)
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID in referenced
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Right lung", "Left lung"]

    # The SR references the SEG and reports each lung's volume within 5% of the truth.
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert set(chest_phantom.sop_instance_uids) <= evidence
    volumes = _sr_volumes(sr)
    assert volumes["Right lung"] == pytest.approx(chest_phantom.right_lung_ml, rel=0.05)
    assert volumes["Left lung"] == pytest.approx(chest_phantom.left_lung_ml, rel=0.05)

    assert dciodvfy_errors(segs[0]) == []
    assert dciodvfy_errors(srs[0]) == []
    assert code_problems(seg) == []
    assert code_problems(sr) == []

    events = {e["event"] for e in infergate.events()}
    assert {
        "ingest.association.accepted",
        "assembly.series.complete",
        "routing.series.routed",
        "inference.job.done",
        "export.sent",
    } <= events
    _assert_no_phi(infergate, chest_phantom.identity)


def _recorded_dice() -> tuple[float, float]:
    """The Dice of ct_lung_unet on the suite's chest phantom that its training record
    (and model card) states, per lung."""
    record = REPO / "model_repository" / "ct_lung_unet" / "train" / "VALIDATION.md"
    for line in record.read_text(encoding="utf-8").splitlines():
        if line.startswith("| the suite's chest phantom") and "| truth |" in line:
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            return float(cells[2]), float(cells[3])
    raise AssertionError(f"{record} states no Dice on the suite's chest phantom")


def _dice(found: npt.NDArray[np.bool_], truth: npt.NDArray[np.bool_]) -> float:
    both = float(np.count_nonzero(found & truth))
    return 2.0 * both / float(np.count_nonzero(found) + np.count_nonzero(truth))


def test_the_trained_network_segments_the_phantom_as_its_record_says(
    infergate: InfergateProcess, orthanc: Orthanc, chest_phantom: ChestPhantom, tmp_path: Path
) -> None:
    """ct_lung_unet (opt-in, listed alone) on the embedded Triton, the volume in chunks
    of slices through shared memory: in Orthanc, a SEG whose lungs match the phantom's
    truth at least as well as the model card says, naming the plugin and the model's
    version, and an SR with each lung's volume; both valid."""
    infergate.config["plugins"] = {"enabled": ["ct_lung_unet"]}
    infergate.start()
    storescu(infergate.port, list(chest_phantom.paths))
    (sent,) = infergate.wait_event("export.sent", timeout=240)
    assert sent["kinds"] == ["seg", "sr"]

    (seg_path,) = _fetch(orthanc, chest_phantom.study_uid, "SEG", tmp_path)
    (sr_path,) = _fetch(orthanc, chest_phantom.study_uid, "SR", tmp_path)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    seg = hd.seg.segread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung"]
    (algorithm,) = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("ct_lung_unet", "1.0.0")
    assert "triton_model=ct_lung_unet" in algorithm.AlgorithmParameters
    assert "triton_model_version=1" in algorithm.AlgorithmParameters

    # The SEG's frames against the truth, instance by instance.
    uids = list(chest_phantom.sop_instance_uids)
    found = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    truth = np.stack([chest_phantom.truth(i) for i in range(len(uids))])
    right, left = _recorded_dice()
    # The card quotes the record to 3 places (0.988, 0.989): another CPU's arithmetic
    # may move a few voxels on a lung's border, not a thousandth of its Dice.
    assert _dice(found[..., 0] > 0, truth == RIGHT_LUNG_LABEL) >= math.floor(right * 1000) / 1000
    assert _dice(found[..., 1] > 0, truth == LEFT_LUNG_LABEL) >= math.floor(left * 1000) / 1000

    volumes = _sr_volumes(pydicom.dcmread(sr_path))
    assert volumes["Right lung"] == pytest.approx(chest_phantom.right_lung_ml, rel=0.05)
    assert volumes["Left lung"] == pytest.approx(chest_phantom.left_lung_ml, rel=0.05)
    (done,) = infergate.wait_event("inference.job.done", timeout=5)
    assert done["plugin"] == "ct_lung_unet"
    _assert_no_phi(infergate, chest_phantom.identity)

    # infergate check, on the gateway's own Triton: the plugin against the live model.
    checked = run_cli("check", "--config", "infergate.yaml", cwd=infergate.workdir)
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]
    events = json_events(checked.stdout)
    (ok,) = [e for e in events if e["event"] == "check.plugin.ok"]
    assert (ok["plugin"], ok["version"], ok["model"]) == ("ct_lung_unet", "1.0.0", "ct_lung_unet")


def test_real_head_ct_reports_no_lungs(
    infergate: InfergateProcess, orthanc: Orthanc, head_ct: list[Path], tmp_path: Path
) -> None:
    """A head is not a chest: ct_lung's own rule does not take it, and run on it by a
    hospital's rule anyway, the lung plugin must say so, not crash or invent lungs."""
    study_uid = pydicom.dcmread(head_ct[0], stop_before_pixels=True).StudyInstanceUID
    # Relative, like the default var_dir: the server resolves it in its working directory.
    infergate.config["storage"]["var_dir"] = "var"
    # A site that sends every CT to ct_lung (its default rule wants a chest).
    infergate.config["routing"] = {
        "rules": [{"name": "every-ct", "plugins": ["ct_lung"], "when": {"modality": ["CT"]}}]
    }
    infergate.start()
    storescu(infergate.port, head_ct)
    # Both CT plugins run on the head CT; each sends one SR and nothing else.
    assert _wait_sent_kinds(infergate, 2, timeout=180) == ["sr", "sr"]

    assert _fetch(orthanc, study_uid, "SEG", tmp_path) == []
    srs = _fetch(orthanc, study_uid, "SR", tmp_path)
    assert len(srs) == 2
    # Two plugins' reports in one study: each its own series number and description.
    # The default SR number is 9002; the plugins in name order add 10 each.
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in srs]
    reports = {str(ds.SeriesDescription): int(ds.SeriesNumber) for ds in headers}
    assert reports == {
        "Head CT hemorrhage triage (AI SR, not for clinical use)": 9002,
        "Lung segmentation (AI SR, not for clinical use)": 9012,
    }
    findings = set()
    for path in srs:
        sr = pydicom.dcmread(path)
        assert sr.StudyInstanceUID == study_uid
        assert _sr_volumes(sr) == {}
        assert dciodvfy_errors(path) == []
        findings |= {
            (item.ConceptNameCodeSequence[0].CodeMeaning, item.ConceptCodeSequence[0].CodeMeaning)
            for item in walk_content(sr.ContentSequence)
            if item.ValueType == "CODE"
        }
    assert ("Lung", "Absent") in findings
    assert ("Hemorrhage", "Absent") in findings
    done = {e["plugin"]: e for e in infergate.wait_event("inference.job.findings", 5, count=2)}
    assert done["ct_lung"]["lungs_found"] == 0
    assert done["ct_head_bleed"]["candidates"] == 0
    routed = infergate.wait_event("routing.series.routed", timeout=5)[0]
    priorities = {d["plugin"]: d["priority"] for d in routed["decisions"] if d["matched"]}
    assert priorities == {"ct_head_bleed": "urgent", "ct_lung": "normal"}
    # The real file's own patient module must not leak either (highdicom warns about
    # its single-component name, quoting it).
    source = pydicom.dcmread(head_ct[0], stop_before_pixels=True)
    text = infergate.log_text()
    assert str(source.PatientName) not in text
    assert str(source.PatientID) not in text


def test_head_ct_with_a_bleed_gets_urgent_seg_and_sr(
    infergate: InfergateProcess, orthanc: Orthanc, bleed_head: HeadPhantom, tmp_path: Path
) -> None:
    infergate.config["plugins"] = {"enabled": ["ct_head_bleed"]}
    infergate.start()
    storescu(infergate.port, list(bleed_head.paths))
    (sent,) = infergate.wait_event("export.sent", timeout=180)
    assert sent["kinds"] == ["seg", "sr"]
    assert sent["priority"] == "urgent"
    (findings,) = infergate.wait_event("inference.job.findings", timeout=5)
    assert findings["urgent"] is True
    assert findings["candidates"] == 2

    (seg_path,) = _fetch(orthanc, bleed_head.study_uid, "SEG", tmp_path)
    (sr_path,) = _fetch(orthanc, bleed_head.study_uid, "SR", tmp_path)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    seg = pydicom.dcmread(seg_path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [
        "Hyperdense candidate 1",
        "Hyperdense candidate 2",
    ]
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced <= set(bleed_head.sop_instance_uids)
    # Each candidate's group in the SR: its volume (within 10% of what was inserted) and side.
    groups = {
        str(group["Tracking Identifier"]): group
        for group in _sr_groups(pydicom.dcmread(sr_path))
        if "Volume" in group
    }
    right_ml, left_ml = bleed_head.hyperdensity_ml
    first, second = groups["Hyperdense candidate 1"], groups["Hyperdense candidate 2"]
    assert first["Volume"] == pytest.approx(right_ml, rel=0.1)
    assert (first["Laterality"], first["Finding Site"]) == ("Right", "Brain")
    assert second["Volume"] == pytest.approx(left_ml, rel=0.1)
    assert second["Laterality"] == "Left"
    _assert_no_phi(infergate, bleed_head.identity)


def test_multiframe_ct_gets_seg_and_sr_on_its_frames(
    infergate: InfergateProcess, orthanc: Orthanc, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    """The phantom as one multi-frame instance, frames shuffled: the same lung volumes as
    the single-frame series, and a SEG whose frames derive from the source's frames."""
    source = write_multiframe_ct(list(small_phantom.paths), tmp_path / "mf" / "ct.dcm")
    infergate.config["plugins"] = {"enabled": ["ct_lung"]}
    infergate.start()
    # storescu proposes a fixed list of SOP classes unless told to propose what it sends.
    storescu(infergate.port, [source], options=("--required",))
    (sent,) = infergate.wait_event("export.sent", timeout=120)
    assert sent["kinds"] == ["seg", "sr"]
    source_uid = pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    (seg_path,) = _fetch(orthanc, small_phantom.study_uid, "SEG", tmp_path)
    (sr_path,) = _fetch(orthanc, small_phantom.study_uid, "SR", tmp_path)
    assert dciodvfy_errors(seg_path) == []
    assert dciodvfy_errors(sr_path) == []
    seg = pydicom.dcmread(seg_path)
    frames = {
        int(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for item in seg.PerFrameFunctionalGroupsSequence
    }
    assert frames <= set(range(1, 41))
    (series,) = seg.ReferencedSeriesSequence
    assert [r.ReferencedSOPInstanceUID for r in series.ReferencedInstanceSequence] == [source_uid]
    volumes = _sr_volumes(pydicom.dcmread(sr_path))
    assert volumes["Right lung"] == pytest.approx(small_phantom.right_lung_ml, rel=0.03)
    assert volumes["Left lung"] == pytest.approx(small_phantom.left_lung_ml, rel=0.03)


def test_chest_radiograph_gets_a_quality_sr_only(
    infergate: InfergateProcess, orthanc: Orthanc, tmp_path: Path
) -> None:
    """A rotated DX stored as MONOCHROME1 but inverted, and a good CR of the same study:
    each gets its own verdicts in an SR (no SEG), routed by the plugin's default rule."""
    bad = write_chest_radiograph(
        tmp_path / "bad", photometric="MONOCHROME1", stored_inverted=True, rotation=0.2
    )
    good = write_chest_radiograph(tmp_path / "good", modality="CR", seed=4)
    ds = pydicom.dcmread(good.path)
    ds.StudyInstanceUID = bad.study_uid
    ds.save_as(good.path)
    infergate.start()
    storescu(infergate.port, [bad.path, good.path])

    assert _wait_sent_kinds(infergate, 2) == ["sr", "sr"]
    routed = infergate.events()
    assert {e["plugin"] for e in routed if e["event"] == "inference.job.findings"} == {
        "cxr_quality"
    }

    reports = _fetch(orthanc, bad.study_uid, "SR", tmp_path)
    assert len(reports) == 2
    assert _fetch(orthanc, bad.study_uid, "SEG", tmp_path) == []
    verdicts: dict[str, dict[str, object]] = {}
    for path in reports:
        assert dciodvfy_errors(path) == []
        for group in _sr_groups(pydicom.dcmread(path)):
            if "image" in group:
                verdicts[str(group["image"])] = group
    flagged, passed = verdicts[bad.sop_instance_uid], verdicts[good.sop_instance_uid]
    assert flagged["Grayscale inverted against Photometric"] == "Present"
    assert flagged["Positioning"] == "Present"
    assert flagged["Mediastinal offset (rotation index)"] == pytest.approx(0.2, abs=0.02)
    assert flagged["Exposure clipped in lung fields"] == "Absent"
    assert flagged["Image Quality"] == "Usable - Does not meet the quality control standard"
    assert passed["Grayscale inverted against Photometric"] == "Absent"
    assert passed["Positioning"] == "Absent"
    assert passed["Image Quality"] == "Usable - Meets the quality control standard"
    _assert_no_phi(infergate, bad.identity)


@pytest.mark.parametrize("kill_after", ["acknowledged", "inference_started"])
def test_sigkill_loses_nothing_and_sends_results_once(
    tmp_path: Path, orthanc: Orthanc, chest_phantom: ChestPhantom, kill_after: str
) -> None:
    """SIGKILL after the instances were acknowledged (series not yet complete), or while
    the job runs: after a restart the study is processed and its results arrive once."""
    quiet = 30.0 if kill_after == "acknowledged" else 0.5
    server = InfergateProcess(
        tmp_path / "infergate", infergate_config(tmp_path / "var", orthanc, quiet_s=quiet)
    )
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(chest_phantom.paths))
        if kill_after == "inference_started":
            server.wait_event("inference.job.started", timeout=60)
        server.kill()
        first_run = {e["event"] for e in server.events()}
        assert "export.sent" not in first_run
        if kill_after == "acknowledged":
            assert "assembly.series.complete" not in first_run

        server.config["assembly"]["quiet_period_s"] = 0.5
        server.start()
        server.wait_event("export.sent", timeout=180)
        # Give a duplicate every chance to show up before counting.
        server.wait_event("inference.job.done", timeout=10)
        server.stop()
    finally:
        server.stop()

    assert len([e for e in server.events() if e["event"] == "export.sent"]) == 1
    assert len(orthanc.find_instances(chest_phantom.study_uid, "SEG")) == 1
    assert len(orthanc.find_instances(chest_phantom.study_uid, "SR")) == 1
    stored = [e for e in server.events() if e["event"] == "ingest.association.released"]
    assert stored[0]["instances"] == len(chest_phantom.paths)
    assert orthanc.get("/statistics")["CountInstances"] == 2


def test_a_late_instance_runs_the_series_again_and_the_new_sr_supersedes_the_first(
    infergate: InfergateProcess, orthanc: Orthanc, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    paths = list(small_phantom.paths)
    infergate.start()
    storescu(infergate.port, paths[:-1])
    infergate.wait_event("export.delivered", timeout=120)
    storescu(infergate.port, paths[-1:])  # the last slice, late
    infergate.wait_event("export.delivered", timeout=120, count=2)
    reports = [
        pydicom.dcmread(path) for path in _fetch(orthanc, small_phantom.study_uid, "SR", tmp_path)
    ]
    assert len(reports) == 2
    (later,) = [r for r in reports if "PredecessorDocumentsSequence" in r]
    (earlier,) = [r for r in reports if r is not later]
    reference = later.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert reference.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == earlier.SOPInstanceUID
    (done,) = [e for e in infergate.events() if e["event"] == "inference.job.findings"][1:]
    assert done["supersedes_job"] is not None


def test_results_wait_for_a_pacs_that_is_down(tmp_path: Path, small_phantom: ChestPhantom) -> None:
    """A destination that refuses connections gets retries; results arrive once it is up."""
    orthanc = Orthanc(tmp_path / "orthanc")  # configured, not started yet
    server = InfergateProcess(tmp_path / "infergate", infergate_config(tmp_path / "var", orthanc))
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(small_phantom.paths))
        retry = server.wait_event("export.retrying", timeout=120, fail_on=("export.dead_letter",))[
            0
        ]
        assert "gave no A-ASSOCIATE response" in retry["reason"]
        assert retry["outcome"] == "transient"
        orthanc.start()
        server.wait_event("export.sent", timeout=120, fail_on=("export.dead_letter",))
    finally:
        server.stop()
        orthanc.stop()
    sent = [e for e in server.events() if e["event"] == "export.sent"]
    assert len(sent) == 1
    assert sent[0]["attempt"] >= 2
