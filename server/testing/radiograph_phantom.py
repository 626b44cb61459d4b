"""A synthetic frontal chest radiograph with known quality defects, written as DICOM.

Drawn as it is displayed (brighter is more attenuation): air outside the body, the
thorax of soft tissue, two dark lung fields, the mediastinum and heart between them
with the spine down its middle, ribs across the lungs, and the abdomen under the
diaphragm. The defects a quality check looks for can be put in, each with its truth:

- ``rotation``: the patient turned about the long axis, which moves the mediastinum
  and spine off the middle between the lungs' outer edges (by this fraction of the
  half width across both lungs);
- ``stored_inverted``: pixel data stored as the negative of what Photometric
  Interpretation says (the image displays as a negative);
- ``saturation``: displayed values below this level clamped to the darkest value, as
  an over-exposed detector does to the lungs.

``photometric`` MONOCHROME1 stores the same image the other way round, correctly.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)
from scipy import ndimage

from infergate.testing.phantoms import PhantomIdentity

BITS = 12
_MAX = 2**BITS - 1
AIR = 0.04
SOFT_TISSUE = 0.55
LUNG = 0.2
MEDIASTINUM = 0.68
SPINE = 0.82
RIB = 0.12  # added over the lungs
ABDOMEN = 0.66


@dataclass(frozen=True)
class ChestRadiograph:
    """What was written, and the truth to compare a quality check with."""

    path: Path
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    rotation: float
    stored_inverted: bool
    # The fraction of the lung fields' pixels clamped to the darkest value.
    clipped_lung_fraction: float
    identity: PhantomIdentity


def chest_radiograph_image(
    rows: int = 512,
    columns: int = 512,
    *,
    rotation: float = 0.0,
    saturation: float = 0.0,
    seed: int = 11,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The displayed image (0 black .. 1 white) and the lung fields' mask."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:columns].astype(np.float64)
    u = (x + 0.5) / columns - 0.5  # -0.5 (image left: patient's right) .. 0.5
    v = (y + 0.5) / rows  # 0 top (head) .. 1 bottom (feet)
    image = np.full((rows, columns), AIR)
    thorax = (u / 0.44) ** 4 + ((v - 0.78) / 0.74) ** 4 <= 1.0
    thorax &= v >= 0.04
    image[thorax] = SOFT_TISSUE
    # Turning the patient moves what lies in the middle (mediastinum, spine) across
    # the thorax, and narrows one lung while widening the other.
    lung_half_width = 0.34
    mid = rotation * lung_half_width
    top, diaphragm = 0.14, 0.72
    height = diaphragm - top
    centre_v = (top + diaphragm) / 2.0
    right_inner, left_inner = mid - 0.085, mid + 0.085
    right_outer, left_outer = -lung_half_width, lung_half_width
    lungs = np.zeros_like(thorax)
    for inner, outer in ((right_inner, right_outer), (left_inner, left_outer)):
        centre_u, semi_u = (inner + outer) / 2.0, abs(outer - inner) / 2.0
        lungs |= ((u - centre_u) / semi_u) ** 2 + ((v - centre_v) / (height / 2.0)) ** 4 <= 1.0
    # The heart bulges into the lower left lung field (image right), below the hila.
    heart = ((u - mid - 0.07) / 0.16) ** 2 + ((v - 0.62) / 0.13) ** 2 <= 1.0
    lungs &= ~heart
    image[lungs] = LUNG
    for k in range(7):  # ribs: gentle arcs across both lung fields
        arc = np.abs(v - (top + 0.05 + k * 0.075) - 0.08 * u**2 * 4) <= 0.012
        image[arc & lungs] += RIB
    image[heart & thorax] = MEDIASTINUM
    image[(np.abs(u - mid) <= 0.06) & (v >= top - 0.05) & thorax & ~lungs] = MEDIASTINUM
    image[(np.abs(u - mid) <= 0.025) & (v >= 0.03) & thorax] = SPINE
    image[(v > diaphragm + 0.02 * np.cos(u * 8)) & thorax & ~lungs] = ABDOMEN
    image = ndimage.gaussian_filter(image, sigma=max(rows, columns) / 400.0)
    image += rng.normal(0.0, 0.01, size=image.shape)
    image = np.clip(image, 0.0, 1.0)
    if saturation > 0.0:
        image[image < saturation] = 0.0
    return image, lungs


def write_chest_radiograph(
    directory: Path,
    *,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: float = 0.7,
    modality: Literal["DX", "CR"] = "DX",
    photometric: Literal["MONOCHROME1", "MONOCHROME2"] = "MONOCHROME2",
    rotation: float = 0.0,
    stored_inverted: bool = False,
    saturation: float = 0.0,
    patient_orientation: tuple[str, str] | None = ("L", "F"),
    seed: int = 11,
    identity: PhantomIdentity | None = None,
) -> ChestRadiograph:
    """Write one frontal chest radiograph into ``directory`` and return its truth."""
    ident = identity or PhantomIdentity()
    directory.mkdir(parents=True, exist_ok=True)
    image, lungs = chest_radiograph_image(
        rows, columns, rotation=rotation, saturation=saturation, seed=seed
    )
    clipped = float((image[lungs] <= 0.0).mean())
    stored = np.rint(image * _MAX)
    # MONOCHROME1 shows the lowest value white; an inverted image is stored the
    # other way round from what its Photometric Interpretation says.
    if (photometric == "MONOCHROME1") != stored_inverted:
        stored = _MAX - stored
    ds = _radiograph_dataset(ident, modality, photometric)
    ds.Rows, ds.Columns = rows, columns
    ds.ImagerPixelSpacing = [pixel_spacing, pixel_spacing]
    if patient_orientation is not None:
        ds.PatientOrientation = list(patient_orientation)
    ds.PixelData = stored.astype(np.uint16).tobytes()
    path = directory / f"{modality.lower()}-{ds.SOPInstanceUID[-8:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return ChestRadiograph(
        path=path,
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        rotation=rotation,
        stored_inverted=stored_inverted,
        clipped_lung_fraction=clipped,
        identity=ident,
    )


def _radiograph_dataset(ident: PhantomIdentity, modality: str, photometric: str) -> Dataset:
    sop_class = (
        DigitalXRayImageStorageForPresentation
        if modality == "DX"
        else ComputedRadiographyImageStorage
    )
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ident.accession_number
    ds.Modality = modality
    ds.Manufacturer = "Infergate test phantom"
    ds.ReferringPhysicianName = "REFERRER^PHI"
    ds.StudyDescription = "CHEST RADIOGRAPH PHANTOM"
    ds.SeriesDescription = "CHEST PA"
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.patient_birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = BITS
    ds.HighBit = BITS - 1
    ds.PixelRepresentation = 0
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = 1 if photometric == "MONOCHROME2" else -1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.PresentationLUTShape = "IDENTITY" if photometric == "MONOCHROME2" else "INVERSE"
        ds.ImageLaterality = "U"
        ds.BurnedInAnnotation = "NO"
        ds.LossyImageCompression = "00"
    ds.WindowCenter, ds.WindowWidth = _MAX // 2, _MAX
    return ds
