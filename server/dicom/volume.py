"""Turning the spooled instances of a series into a volume for a plugin.

Slices are ordered by position along the slice normal (the cross product of the
row and column directions), never by Instance Number or file order. The modality
LUT (Rescale Slope and Intercept) is applied.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from infergate.errors import VolumeError
from infergate.plugin_api import Series

# Positions along the normal closer than this are the same slice position (mm).
_SAME_POSITION_MM = 1e-3


@dataclass(frozen=True)
class LoadedSeries:
    """A volume and the headers of its slices, in volume order, pixel data dropped."""

    series: Series
    headers: tuple[Dataset, ...]


def _vector(ds: Dataset, keyword: str, length: int, path: Path) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None or len(value) != length:
        raise VolumeError(f"instance {path.name} has no usable {keyword}")
    return np.array([float(v) for v in value], dtype=np.float64)


def load_series(paths: list[Path]) -> LoadedSeries:
    """Read ``paths`` (one series) into a :class:`LoadedSeries`.

    Raises :class:`VolumeError` when slices disagree in size or orientation, share a
    position, or lack geometry.
    """
    if not paths:
        raise VolumeError("series has no instances")
    slices: list[tuple[float, Dataset, npt.NDArray[np.float32]]] = []
    orientation: npt.NDArray[np.float64] | None = None
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            raise VolumeError(f"instance {path.name} cannot be read: {exc}") from exc
        iop = _vector(ds, "ImageOrientationPatient", 6, path)
        if orientation is None:
            orientation = iop
        elif not np.allclose(iop, orientation, atol=1e-4):
            raise VolumeError(f"instance {path.name} has a different orientation from the series")
        normal = np.cross(iop[:3], iop[3:])
        position = _vector(ds, "ImagePositionPatient", 3, path)
        try:
            pixels = ds.pixel_array.astype(np.float32)
        except Exception as exc:  # pixel handlers raise many types
            raise VolumeError(f"instance {path.name}: pixel data cannot be decoded: {exc}") from exc
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0:
            pixels *= slope
        if intercept != 0.0:
            pixels += intercept
        del ds.PixelData
        slices.append((float(np.dot(position, normal)), ds, pixels))

    shapes = {pixels.shape for _, _, pixels in slices}
    if len(shapes) != 1:
        raise VolumeError(f"slices differ in size: {sorted(shapes)}")
    slices.sort(key=lambda item: item[0])
    distances = np.array([item[0] for item in slices])
    gaps = np.diff(distances)
    if len(gaps) and float(gaps.min()) < _SAME_POSITION_MM:
        raise VolumeError("two or more slices share a position along the slice normal")
    first = slices[0][1]
    row_spacing, column_spacing = (float(v) for v in _vector(first, "PixelSpacing", 2, paths[0]))
    slice_spacing = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1))
    if orientation is None:  # unreachable: paths is not empty
        raise VolumeError("series has no instances")
    series = Series(
        modality=str(first.get("Modality", "")),
        volume=np.stack([pixels for _, _, pixels in slices]),
        spacing=(slice_spacing, row_spacing, column_spacing),
        row_direction=(float(orientation[0]), float(orientation[1]), float(orientation[2])),
        column_direction=(float(orientation[3]), float(orientation[4]), float(orientation[5])),
        origin=tuple(float(v) for v in _vector(first, "ImagePositionPatient", 3, paths[0])),  # type: ignore[arg-type]
    )
    return LoadedSeries(series=series, headers=tuple(ds for _, ds, _ in slices))
