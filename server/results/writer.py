"""Encoding a job's findings into result objects and writing them durably."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom.dataset import Dataset

from infergate.durable import fsync_dir
from infergate.errors import ResultEncodingError, VolumeError
from infergate.inference.volume import LoadedSeries
from infergate.plugin_api import Findings, PluginSpec
from infergate.results.identity import ResultIdentity
from infergate.results.seg import build_segmentation
from infergate.results.sources import SourceSlices
from infergate.results.sr import build_report
from infergate.work.states import ResultKind


@dataclass(frozen=True)
class EncodedResult:
    kind: ResultKind  # SEG or SR
    dataset: Dataset

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


# Type 2 attributes of the Patient and General Study modules that result objects copy
# from the source. Scanners and anonymisers omit them; DICOM wants them present, empty
# when unknown (PS3.3 C.7.1.1, C.7.2.1).
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


# Said when a de-identified source names no method: we copy the fact, not a guess.
DEIDENTIFICATION_UNSTATED = "NOT STATED BY SOURCE"


def conformant_source(headers: tuple[Dataset, ...]) -> tuple[Dataset, ...]:
    """``headers`` repaired where result objects would copy a defect into our output.

    Receiving is tolerant; encoding is strict. Absent Type 2 patient and study
    attributes are added empty; a source marked de-identified without a method
    (Type 1C) gets one that says so. The headers are the job's own copies.
    """
    for ds in headers:
        for keyword in _TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, "")
        if (
            ds.get("PatientIdentityRemoved") == "YES"
            and not ds.get("DeidentificationMethod")
            and not ds.get("DeidentificationMethodCodeSequence")
        ):
            ds.DeidentificationMethod = DEIDENTIFICATION_UNSTATED
    return headers


def encode(
    loaded: LoadedSeries, findings: Findings, spec: PluginSpec, identity: ResultIdentity
) -> list[EncodedResult]:
    """The job's result objects: a SEG when there are segments, and always an SR."""
    results: list[EncodedResult] = []
    source = SourceSlices(conformant_source(loaded.headers), loaded.frames)
    if findings.label_map is not None:
        # Results describe the acquired slices, whatever grid the plugin saw.
        findings = replace(findings, label_map=loaded.source_label_frames(findings.label_map))
    seg = None
    if findings.label_map is not None and findings.segment_numbers:
        seg = build_segmentation(source, findings, spec, identity)
        results.append(EncodedResult(ResultKind.SEG, seg))
    about_images = {
        item.image_index
        for items in (findings.evaluations, findings.measurements)
        for item in items
        if item.image_index is not None and item.segment_number is None
    }
    try:
        images = {i: loaded.acquired_at(i) for i in sorted(about_images)}
    except VolumeError as exc:
        raise ResultEncodingError(f"plugin {spec.name} reported on {exc}") from exc
    report = build_report(source, seg, findings, spec, identity, images=images)
    results.append(EncodedResult(ResultKind.SR, report))
    return results


def write_result(directory: Path, result: EncodedResult) -> Path:
    """Write ``result`` to ``directory`` durably; its name comes from its kind, not DICOM data."""
    return write_dataset(directory, result.kind.value, result.dataset)


def write_dataset(directory: Path, name: str, dataset: Dataset, *, sync_dir: bool = True) -> Path:
    """Write ``dataset`` as ``name``.dcm in ``directory``, durably: a partial file,
    fsynced, renamed, and (unless the caller does it once for many) the folder
    fsynced."""
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / f"{name}.dcm"
    partial = directory / f".{name}.dcm.partial"
    try:
        dataset.save_as(partial, enforce_file_format=True)
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.rename(partial, final)
        if sync_dir:
            fsync_dir(directory)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise ResultEncodingError(f"cannot write result {final}: {exc.strerror}") from exc
    return final
