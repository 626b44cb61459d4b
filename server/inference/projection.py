"""What makes a projection image (CR, DX, ...) a plugin can read like a slice.

Projection radiographs have no Image Position or Orientation (Patient): their
geometry is Patient Orientation (the patient directions of the rows and columns)
and a pixel spacing, calibrated (Pixel Spacing) or at the detector (Imager Pixel
Spacing). Their pixel values may run either way: MONOCHROME1 shows the lowest value
white. The plugin always gets values as displayed, brighter is higher, so a check
for an image that looks inverted compares what is shown with what was meant.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset

from infergate.errors import VolumeError

# Patient Orientation letters (PS3.3 C.7.6.1.1.1) as LPS direction vectors.
_DIRECTIONS = {
    "L": (1.0, 0.0, 0.0),
    "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0),
    "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0),
    "F": (0.0, 0.0, -1.0),
}
# A frontal chest radiograph as it is hung: rows towards the patient's left, columns
# towards the feet. Taken when Patient Orientation is absent, and said so.
ASSUMED_ORIENTATION = ("L", "F")


def displayed(pixels: npt.NDArray[np.float32], ds: Dataset) -> npt.NDArray[np.float32]:
    """``pixels`` (after the modality LUT) on the scale brighter is higher.

    MONOCHROME1 values are mirrored within the range the stored bits can hold, after
    the rescale, so the same image stored either way gives the same values.
    """
    if str(ds.get("PhotometricInterpretation", "")).upper() != "MONOCHROME1":
        return pixels
    bits = int(ds.get("BitsStored", 16) or 16)
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        low, high = 0, 2**bits - 1
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    mirrored: npt.NDArray[np.float32] = (ends[0] + ends[1] - pixels).astype(np.float32)
    return mirrored


def pixel_spacing(ds: Dataset, name: str) -> tuple[float, float]:
    """Row and column spacing in mm: Pixel Spacing when the image has it (calibrated
    in the patient), else Imager Pixel Spacing (at the detector)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    raise VolumeError(f"instance {name} has neither Pixel Spacing nor Imager Pixel Spacing")


def _direction(letters: str, name: str) -> tuple[float, float, float]:
    vector = np.zeros(3)
    for letter in letters.upper():
        if letter not in _DIRECTIONS:
            raise VolumeError(f"instance {name} has Patient Orientation {letters!r}, not LRAPHF")
        vector += _DIRECTIONS[letter]
    norm = float(np.linalg.norm(vector))
    if norm == 0.0:
        raise VolumeError(f"instance {name} has Patient Orientation {letters!r}, no direction")
    return (float(vector[0] / norm), float(vector[1] / norm), float(vector[2] / norm))


def patient_orientation(
    ds: Dataset, name: str
) -> tuple[tuple[float, float, float], tuple[float, float, float], str | None]:
    """The row and column directions (LPS) from Patient Orientation, and what was
    assumed when the image has none (None when nothing was)."""
    value = ds.get("PatientOrientation")
    assumed = None
    if value is None or len(value) != 2 or not all(str(v) for v in value):
        value, assumed = (
            ASSUMED_ORIENTATION,
            (
                "no Patient Orientation: rows taken as towards the patient's left,"
                " columns towards the feet"
            ),
        )
    return _direction(str(value[0]), name), _direction(str(value[1]), name), assumed
