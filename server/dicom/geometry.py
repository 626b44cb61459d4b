"""Geometry read from headers, shared by routing (facts about a series) and volume
building: which images are projections, the plane of an image, and whether slice
positions are evenly spaced. Headers only; nothing here loads pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

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


def frame_attribute(ds: Dataset, keyword: str) -> Any:
    """The value of ``keyword`` at the top level of ``ds`` or, in a multi-frame image
    (PS3.3 C.7.6.16), in a macro of its shared functional groups, else of its first
    frame's; None when it is in none of them, or empty."""
    places = [ds]
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        items = ds.get(groups)
        if items:
            places += [e.value[0] for e in items[0] if e.VR == "SQ" and e.value]
    for place in places:
        value = place.get(keyword)
        if value not in (None, ""):
            return value
    return None


def _orientation(ds: Dataset) -> Sequence[float] | None:
    """Image Orientation (Patient), wherever a single- or multi-frame image has it."""
    iop = frame_attribute(ds, "ImageOrientationPatient")
    return None if iop is None else [float(v) for v in iop]


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
