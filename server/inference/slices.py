"""Reading spooled instances into slices, with their geometry and modality values.

A single-frame image is one slice. A multi-frame image with functional groups
(Enhanced CT and MR, Legacy Converted Enhanced) is one slice per frame: each frame's
position, orientation, pixel spacing and rescale come from its Per-frame Functional
Groups, else from the Shared ones (PS3.3 C.7.6.16). Frames keep their frame number,
so results can refer to them. A projection image (CR, DX) has no place in a volume:
its values are turned to "as displayed" (``projection``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from infergate.dicom.geometry import is_projection
from infergate.errors import VolumeError
from infergate.inference.projection import displayed


@dataclass
class Slice:
    path: Path
    header: Dataset  # pixel data dropped; shared by the frames of one instance
    pixels: npt.NDArray[np.float32]
    # Zero for a projection image, which has no place in a volume.
    orientation: npt.NDArray[np.float64]
    position: npt.NDArray[np.float64]
    projection: bool
    frame: int | None = None  # 1-based, in a multi-frame instance
    pixel_spacing: tuple[float, float] | None = None  # from a frame's functional groups


def vector(ds: Dataset, keyword: str, length: int, where: str) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None or len(value) != length:
        raise VolumeError(f"{where} has no usable {keyword}")
    return np.array([float(v) for v in value], dtype=np.float64)


def _rescaled(pixels: npt.NDArray[np.float32], source: Dataset) -> npt.NDArray[np.float32]:
    slope = float(source.get("RescaleSlope", 1) or 1)
    intercept = float(source.get("RescaleIntercept", 0) or 0)
    if slope != 1.0:
        pixels *= slope
    if intercept != 0.0:
        pixels += intercept
    return pixels


def read_slices(path: Path) -> list[Slice]:
    """The slices in the instance at ``path``: one, or one per frame."""
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise VolumeError(f"instance {path.name} cannot be read: {exc}") from exc
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    enhanced = "PerFrameFunctionalGroupsSequence" in ds
    if frames > 1 and not enhanced:
        raise VolumeError(
            f"instance {path.name} has {frames} frames but no per-frame functional groups"
            " (only Enhanced multi-frame images are read)"
        )
    projection = is_projection(ds)
    if projection and frames > 1:
        raise VolumeError(f"instance {path.name} is a multi-frame projection image")
    try:
        pixels = ds.pixel_array.astype(np.float32)
    except Exception as exc:  # pixel handlers raise many types
        raise VolumeError(f"instance {path.name}: pixel data cannot be decoded: {exc}") from exc
    del ds.PixelData
    if enhanced:
        return _frames(path, ds, pixels.reshape(frames, *pixels.shape[-2:]))
    if projection:
        orientation, position = np.zeros(6), np.zeros(3)
    else:
        where = f"instance {path.name}"
        orientation = vector(ds, "ImageOrientationPatient", 6, where)
        position = vector(ds, "ImagePositionPatient", 3, where)
    pixels = _rescaled(pixels, ds)
    if projection:
        pixels = displayed(pixels, ds)
    return [Slice(path, ds, pixels, orientation, position, projection)]


def _frames(path: Path, ds: Dataset, stack: npt.NDArray[np.float32]) -> list[Slice]:
    """One slice per frame of an Enhanced multi-frame instance."""
    per_frame = ds.PerFrameFunctionalGroupsSequence
    if len(per_frame) != len(stack):
        raise VolumeError(
            f"instance {path.name} has {len(stack)} frames but {len(per_frame)} per-frame"
            " functional groups"
        )
    shared = (
        ds.SharedFunctionalGroupsSequence[0]
        if ds.get("SharedFunctionalGroupsSequence")
        else Dataset()
    )

    def group(item: Dataset, keyword: str) -> Dataset | None:
        for source in (item, shared):
            if source.get(keyword):
                found: Dataset = source[keyword].value[0]
                return found
        return None

    slices = []
    for index, item in enumerate(per_frame):
        where = f"instance {path.name} frame {index + 1}"
        plane_orientation = group(item, "PlaneOrientationSequence")
        plane_position = group(item, "PlanePositionSequence")
        if plane_orientation is None or plane_position is None:
            raise VolumeError(f"{where} has no Plane Orientation or Plane Position")
        measures = group(item, "PixelMeasuresSequence")
        if measures is None:
            raise VolumeError(f"{where} has no Pixel Measures")
        spacing = vector(measures, "PixelSpacing", 2, where)
        transform = group(item, "PixelValueTransformationSequence") or Dataset()
        slices.append(
            Slice(
                path,
                ds,
                _rescaled(stack[index], transform),
                vector(plane_orientation, "ImageOrientationPatient", 6, where),
                vector(plane_position, "ImagePositionPatient", 3, where),
                projection=False,
                frame=index + 1,
                pixel_spacing=(float(spacing[0]), float(spacing[1])),
            )
        )
    return slices
