"""What routing rules may look at in a series: its headers, never its pixels or patient.

Read from every instance's header (pixel data not loaded): the values of the first
instance for modality, SOP class, body part, description and image type; the
orientation from Image Orientation (Patient); the slice count; and whether the
slice positions along the normal are evenly spaced.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from infergate.dicom.projection import is_projection

# A direction cosine at least this large names the plane; below it the plane is oblique.
_PLANE_COSINE = 0.8
# Gaps between slice positions that differ from their median by more than this
# fraction (or 0.01 mm) make the spacing irregular.
_SPACING_TOLERANCE = 0.05


@dataclass(frozen=True)
class SeriesFacts:
    modality: str
    sop_class_uid: str
    body_part: str
    series_description: str
    image_type: tuple[str, ...]
    orientation: str  # axial, coronal, sagittal, oblique, projection (CR, DX), or unknown
    slices: int
    slice_thickness_mm: float | None
    regular_spacing: bool
    calling_ae: str = ""
    called_ae: str = ""


def read_series_facts(
    paths: Iterable[Path], calling_ae: str = "", called_ae: str = ""
) -> SeriesFacts:
    """The facts of the series whose instances are at ``paths`` (headers only)."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    return series_facts(headers, calling_ae, called_ae)


def series_facts(
    headers: Sequence[Dataset], calling_ae: str = "", called_ae: str = ""
) -> SeriesFacts:
    first = headers[0]
    thickness = first.get("SliceThickness")
    return SeriesFacts(
        modality=str(first.get("Modality", "")),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        body_part=str(first.get("BodyPartExamined", "")),
        series_description=str(first.get("SeriesDescription", "")),
        image_type=tuple(str(v) for v in (first.get("ImageType") or ())),
        orientation=orientation_of(first),
        slices=len(headers),
        slice_thickness_mm=float(thickness) if thickness not in (None, "") else None,
        regular_spacing=regularly_spaced(headers),
        calling_ae=calling_ae,
        called_ae=called_ae,
    )


def orientation_of(ds: Dataset) -> str:
    """The anatomical plane of an image from its row and column direction cosines;
    ``projection`` for a projection radiograph, which lies in no plane of the patient."""
    if is_projection(ds):
        return "projection"
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return "unknown"
    normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < _PLANE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def regularly_spaced(headers: Sequence[Dataset]) -> bool:
    """Whether slice positions along the normal are evenly spaced (one slice: yes)."""
    positions = []
    for ds in headers:
        iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
        if iop is None or ipp is None or len(iop) != 6 or len(ipp) != 3:
            return len(headers) == 1
        normal = np.cross([float(v) for v in iop[:3]], [float(v) for v in iop[3:]])
        positions.append(float(np.dot(normal, [float(v) for v in ipp])))
    return not irregular_gaps(np.diff(np.sort(positions)))


def irregular_gaps(gaps: npt.NDArray[np.float64]) -> bool:
    """Whether gaps between consecutive slice positions differ from their median by more
    than the tolerance (two or fewer slices are regular)."""
    if len(gaps) < 2:
        return False
    median = float(np.median(gaps))
    return bool(np.any(np.abs(gaps - median) > max(_SPACING_TOLERANCE * median, 0.01)))
