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

import pydicom
from pydicom.dataset import Dataset

from infergate.dicom.geometry import orientation_of, regularly_spaced


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
