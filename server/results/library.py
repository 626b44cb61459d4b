"""What an SR's Image Library (TID 1600) says of each image the report references
one by one (an outlined slice, an image a finding is about).

highdicom's Image Library reads each image's descriptors (TID 1602-1604) from the
dataset's top level. An enhanced multi-frame image keeps them in its functional
groups, and a received image may lack one (Slice Thickness is Type 2): such an
image is described from its functional groups, and one whose descriptors cannot be
found at all is left out of the library rather than failing the report (it stays in
the evidence and in the content that references it).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom.dataset import Dataset

from infergate.dicom.geometry import frame_attribute

# TID 1604 (cross-sectional) and TID 1603 (projection radiography), by the modalities
# highdicom describes as each, with how many values each attribute must have.
_CROSS_SECTIONAL = {"CT", "MR", "PT"}
_PROJECTION = {"CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"}
_DESCRIPTORS = {
    "cross-sectional": {
        "PixelSpacing": 2,
        "ImageOrientationPatient": 6,
        "ImagePositionPatient": 3,
        "SliceThickness": 1,
    },
    "projection": {"PatientOrientation": 2, "ImagerPixelSpacing": 2},
}
_ALWAYS = ("SOPClassUID", "SOPInstanceUID", "Modality", "Rows", "Columns")


def _value(ds: Dataset, keyword: str, count: int) -> object | None:
    value = frame_attribute(ds, keyword)
    if value is None:
        return None
    values = list(value) if count > 1 else [value]
    found: object = value
    return found if len(values) == count else None


def described(ds: Dataset) -> Dataset | None:
    """The attributes the library entry of ``ds`` is made of, or None when one of
    them is missing."""
    view = Dataset()
    for keyword in _ALWAYS:
        if keyword not in ds or ds.get(keyword) in (None, ""):
            return None
        setattr(view, keyword, ds[keyword].value)
    if ds.get("FrameOfReferenceUID"):
        view.FrameOfReferenceUID = ds.FrameOfReferenceUID
    modality = str(ds.Modality)
    kind = (
        "cross-sectional"
        if modality in _CROSS_SECTIONAL
        else "projection"
        if modality in _PROJECTION
        else None
    )
    for keyword, count in _DESCRIPTORS.get(kind or "", {}).items():
        value = _value(ds, keyword, count)
        if value is None:
            return None
        setattr(view, keyword, value)
    return view


def library_images(instances: Sequence[Dataset]) -> list[Dataset]:
    """The source instances the Image Library can describe, as highdicom reads them."""
    return [view for view in map(described, instances) if view is not None]
