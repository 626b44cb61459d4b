"""Geometry read from headers, shared by routing (facts about a series) and volume
building: which images are projections, the plane of an image, and whether slice
positions are evenly spaced. Headers only; nothing here loads pixels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

# Modalities whose images are projections, not slices of a volume.
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "IO", "PX", "RF", "XA"})

# A direction cosine at least this large names the plane; below it the plane is oblique.
_PLANE_COSINE = 0.8
# Gaps between slice positions that differ from their median by more than this
# fraction (or 0.01 mm) make the spacing irregular.
_SPACING_TOLERANCE = 0.05


def is_projection(ds: Dataset) -> bool:
    return str(ds.get("Modality", "")).upper() in PROJECTION_MODALITIES


def _orientation(ds: Dataset) -> Sequence[float] | None:
    """Image Orientation (Patient): at the top level, or, in a multi-frame image, in
    its shared functional groups or its first frame's (PS3.3 C.7.6.16.2.4)."""
    iop = ds.get("ImageOrientationPatient")
    if iop is not None:
        return [float(v) for v in iop]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(groups)
        if not items:
            continue
        planes = items[0].get("PlaneOrientationSequence")
        if planes and planes[0].get("ImageOrientationPatient") is not None:
            return [float(v) for v in planes[0].ImageOrientationPatient]
    return None


def orientation_of(ds: Dataset) -> str:
    """The anatomical plane of an image from its row and column direction cosines;
    ``projection`` for a projection radiograph, which lies in no plane of the patient."""
    if is_projection(ds):
        return "projection"
    iop = _orientation(ds)
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
