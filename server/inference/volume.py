"""Turning the spooled instances of a series into the regular volume a plugin gets.

Slices are ordered by position along the slice normal (the cross product of the
row and column directions), never by Instance Number or file order. The modality
LUT (Rescale Slope and Intercept) is applied. Instances that do not belong in the
volume (localizers, or another orientation or size mixed into the series) are left
out and said so.

Two acquisitions do not give a regular grid as they are: a stack sheared by gantry
tilt (each slice shifted in plane along the table) and uneven gaps between slices.
``volume.tilt`` and ``volume.irregular_spacing`` decide: ``resample`` onto a
regular grid along the normal (in-plane shift per slice, linear interpolation
between slices), or ``refuse`` the series with the reason. Slices missing from
the stack (a gap over ``volume.max_gap_ratio`` times the series' spacing) are
always refused: resampling would invent them. Whatever the plugin's label map says
about the grid is mapped back onto the acquired slices (``source_label_frames``),
so results overlay the images the radiologist sees.

A multi-frame Enhanced image is read frame by frame (``slices``); its frames are
the slices, ordered along the normal like any others, whatever their frame order.

The volume is laid out from the headers, then filled one slice at a time, in the
array type the plugin asks for (``PluginSpec.volume_type``: int16 HU is half the
bytes of float32), in memory the caller gives (``allocate``: the job's Triton shared
memory, so the model reads the volume where it was built). Nothing the size of the
volume is made but the volume itself: a shear is undone and uneven gaps resampled
slice by slice as they are read.

Projection images (CR, DX: see ``projection``) are no volume: each image becomes
one slice of the plugin's array, in Instance Number order, with its values as
displayed and its geometry from Patient Orientation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import cast

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from scipy import ndimage

from infergate.config import VolumeSettings
from infergate.dicom.geometry import irregular_gaps
from infergate.errors import VolumeError
from infergate.inference.projection import patient_orientation, pixel_spacing
from infergate.inference.slices import Slice, modality_values, read_slices, vector
from infergate.plugin_api import Series, VolumeArray, as_int16

# Where the volume is made: a function of (shape, dtype), like numpy.empty.
Allocate = Callable[[tuple[int, ...], np.dtype[np.float32] | np.dtype[np.int16]], VolumeArray]

# Positions along the normal closer than this are the same slice position (mm).
_SAME_POSITION_MM = 1e-3
# Direction cosines that differ by less than this are the same orientation.
_SAME_ORIENTATION = 1e-4
# An in-plane drift of the slice origins under this fraction of a pixel is not a shear.
_SHEAR_TOLERANCE_PX = 0.1


@dataclass(frozen=True)
class Placement:
    """Where an acquired slice lies in the plugin's volume: its slice index there
    (fractional when resampled) and the in-plane shift (rows, columns, in pixels)
    that was applied to it to undo a shear."""

    index: float
    shift_px: tuple[float, float] = (0.0, 0.0)


@dataclass(frozen=True)
class LoadedSeries:
    """The plugin's volume, and the acquired slices it was built from.

    ``headers`` (pixel data dropped) are the slices used, ordered along the normal,
    with their ``placements``; ``excluded`` says which instances were left out and why;
    ``resampled`` says how the grid differs from the acquisition, if it does;
    ``assumed`` what was taken for granted where the headers say nothing.
    """

    series: Series
    headers: tuple[Dataset, ...]
    placements: tuple[Placement, ...]
    # The frame number of each header's slice in its multi-frame instance; None for a
    # single-frame instance.
    frames: tuple[int | None, ...]
    excluded: tuple[str, ...] = ()
    resampled: str | None = None
    assumed: tuple[str, ...] = ()

    def acquired_at(self, index: int) -> tuple[int, ...]:
        """The acquired slices (indices into ``headers``) that lie at slice ``index`` of
        the plugin's volume: the slice itself unless the volume was resampled."""
        if not 0 <= index < self.series.volume.shape[0]:
            raise VolumeError(
                f"image {index} is outside the volume of {self.series.volume.shape[0]} slices"
            )
        return tuple(i for i, p in enumerate(self.placements) if round(p.index) == index)

    def source_label_frames(self, label_map: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """``label_map`` (the volume's shape) as one frame per acquired slice, in the
        order of ``headers``: the nearest grid slice, shifted back in plane."""
        if label_map.shape != self.series.volume.shape:
            raise VolumeError(
                f"label map has shape {label_map.shape}, the volume {self.series.volume.shape}"
            )
        if self.resampled is None:
            return label_map
        last = label_map.shape[0] - 1
        frames = np.empty((len(self.placements), *label_map.shape[1:]), dtype=np.uint8)
        for i, place in enumerate(self.placements):
            grid = label_map[min(max(round(place.index), 0), last)]
            if place.shift_px == (0.0, 0.0):
                frames[i] = grid
            else:
                back = (-place.shift_px[0], -place.shift_px[1])
                frames[i] = ndimage.shift(grid, back, order=0, mode="constant", cval=0)
        return frames

    def without_volume(self) -> LoadedSeries:
        """This series with its volume's values let go (its shape and type kept):
        what encoding the results needs, once the plugin is done with the volume."""
        volume = self.series.volume
        placeholder = np.broadcast_to(np.zeros((), dtype=volume.dtype), volume.shape)
        return replace(self, series=replace(self.series, volume=cast("VolumeArray", placeholder)))


def _is_localizer(ds: Dataset) -> bool:
    return "LOCALIZER" in {str(v).upper() for v in (ds.get("ImageType") or ())}


def _select(slices: list[Slice]) -> tuple[list[Slice], tuple[str, ...]]:
    """The slices that make the volume: no localizer, and the orientation and size most
    of the series has. The rest are left out, each reason with its count."""
    reasons: Counter[str] = Counter()
    kept = [s for s in slices if not _is_localizer(s.header)]
    reasons["localizer (Image Type)"] = len(slices) - len(kept)
    if not kept:
        raise VolumeError("series holds only localizers")

    def key(s: Slice) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return tuple(np.round(s.orientation / _SAME_ORIENTATION).astype(int)), s.shape

    counts = Counter(key(s) for s in kept)
    (main, main_count), *others = counts.most_common()
    if others and others[0][1] == main_count:
        raise VolumeError(
            f"series mixes {len(counts)} orientations or image sizes in equal numbers"
            f" ({main_count} slices each): no volume to choose"
        )
    volume = [s for s in kept if key(s) == main]
    reasons["another orientation or image size"] = len(kept) - len(volume)
    return volume, tuple(f"{n} {why}" for why, n in reasons.items() if n)


def load_series(
    paths: list[Path],
    settings: VolumeSettings | None = None,
    *,
    volume_type: str = "float32",
    allocate: Allocate = np.empty,
) -> LoadedSeries:
    """Read ``paths`` (one series) into a :class:`LoadedSeries`, its volume of
    ``volume_type`` made by ``allocate``.

    Raises :class:`VolumeError` when no regular volume can be made under ``settings``:
    slices sharing a position, missing slices, a tilt or uneven spacing the policy
    refuses, or instances without geometry.
    """
    policy = settings or VolumeSettings()
    dtype = _volume_dtype(volume_type)
    if not paths:
        raise VolumeError("series has no instances")
    slices, excluded = _select([s for p in paths for s in read_slices(p)])
    if slices[0].projection:
        return _projections(slices, excluded, dtype, allocate)
    _one_multiframe_at_most(slices)
    orientation = slices[0].orientation
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    slices.sort(key=lambda s: float(np.dot(s.position, normal)))
    distances = np.array([float(np.dot(s.position, normal)) for s in slices])
    gaps = np.diff(distances)
    if len(gaps) and float(gaps.min()) < _SAME_POSITION_MM:
        raise VolumeError("two or more slices share a position along the slice normal")
    first = slices[0].header
    row_spacing, column_spacing = slices[0].pixel_spacing or tuple(
        float(v) for v in vector(first, "PixelSpacing", 2, f"instance {slices[0].path.name}")
    )
    spacing = float(np.median(gaps)) if len(gaps) else float(first.get("SliceThickness", 1) or 1)
    irregular = irregular_gaps(gaps)
    if irregular:
        # The finest gap that is not an outlier: the grid keeps every acquired slice's detail.
        spacing = float(gaps[gaps >= spacing / 2].min())
    if len(gaps) and float(gaps.max()) > policy.max_gap_ratio * spacing:
        raise VolumeError(
            f"slices missing: a gap of {float(gaps.max()):.2f} mm along the normal where the"
            f" series' spacing is {spacing:.2f} mm (over volume.max_gap_ratio"
            f" {policy.max_gap_ratio:g})"
        )

    # In-plane drift of each slice's origin from the first's, in pixels (rows, columns).
    drift_mm = np.array([s.position - slices[0].position for s in slices])
    shifts = np.stack([drift_mm @ col_dir / row_spacing, drift_mm @ row_dir / column_spacing], 1)
    sheared = bool(np.abs(shifts).max() > _SHEAR_TOLERANCE_PX) if len(gaps) else False
    changes: list[str] = []
    if sheared:
        extent = float(distances[-1] - distances[0])
        drift = float(np.linalg.norm(drift_mm[-1] - (drift_mm[-1] @ normal) * normal))
        angle = float(np.degrees(np.arctan2(drift, extent)))
        tilt = first.get("GantryDetectorTilt")
        what = f"slices sheared by {angle:.1f} degrees" + (
            f" (Gantry/Detector Tilt {float(tilt):g})" if tilt not in (None, "") else ""
        )
        if policy.tilt == "refuse":
            raise VolumeError(f"{what}; volume.tilt is refuse")
        changes.append(f"{what}: each slice shifted in plane onto the first")
    if irregular:
        what = f"slice gaps from {float(gaps.min()):.2f} to {float(gaps.max()):.2f} mm"
        if policy.irregular_spacing == "refuse":
            raise VolumeError(f"{what}; volume.irregular_spacing is refuse")
        changes.append(f"{what}: resampled every {spacing:.2f} mm along the normal")

    index = (distances - distances[0]) / spacing if len(gaps) else np.zeros(1)
    count = round(float(index[-1])) + 1 if irregular else len(slices)
    volume = allocate((count, *slices[0].shape), dtype)
    _fill(volume, slices, shifts if sheared else None, index if irregular else None)
    volume.flags.writeable = False  # the plugin's to read (the model reads it too)
    placements = tuple(
        Placement(
            float(index[i]) if irregular else float(i),
            (float(shifts[i][0]), float(shifts[i][1])) if sheared else (0.0, 0.0),
        )
        for i in range(len(slices))
    )
    series = Series(
        modality=str(first.get("Modality", "")),
        volume=volume,
        spacing=(spacing, row_spacing, column_spacing),
        row_direction=(float(row_dir[0]), float(row_dir[1]), float(row_dir[2])),
        column_direction=(float(col_dir[0]), float(col_dir[1]), float(col_dir[2])),
        origin=(
            float(slices[0].position[0]),
            float(slices[0].position[1]),
            float(slices[0].position[2]),
        ),
        interpolated=_interpolated(placements, count) if irregular else (),
    )
    return LoadedSeries(
        series=series,
        headers=tuple(s.header for s in slices),
        placements=placements,
        excluded=excluded,
        resampled="; ".join(changes) or None,
        frames=tuple(s.frame for s in slices),
    )


def _interpolated(placements: tuple[Placement, ...], count: int) -> tuple[bool, ...]:
    """For each of ``count`` grid slices, whether no acquired slice lies at it."""
    acquired = {round(p.index) for p in placements}
    return tuple(i not in acquired for i in range(count))


def _one_multiframe_at_most(slices: list[Slice]) -> None:
    """A series made of a multi-frame instance is that instance alone (what a SEG can
    reference: one multi-frame source, or single-frame ones)."""
    multiframe = {str(s.header.SOPInstanceUID) for s in slices if s.frame is not None}
    if multiframe and (len(multiframe) > 1 or any(s.frame is None for s in slices)):
        raise VolumeError(
            f"series has {len(multiframe)} multi-frame instance(s) among"
            f" {len({str(s.header.SOPInstanceUID) for s in slices})}: one multi-frame"
            " instance per series is supported"
        )


def _projections(
    slices: list[Slice],
    excluded: tuple[str, ...],
    dtype: np.dtype[np.float32] | np.dtype[np.int16],
    allocate: Allocate,
) -> LoadedSeries:
    """Projection images as a stack of separate images, in Instance Number order."""
    slices.sort(
        key=lambda s: (int(s.header.get("InstanceNumber") or 0), str(s.header.SOPInstanceUID))
    )
    first = slices[0]
    row_spacing, column_spacing = pixel_spacing(first.header, first.path.name)
    row_dir, col_dir, assumed = patient_orientation(first.header, first.path.name)
    volume = allocate((len(slices), *first.shape), dtype)
    for i, values in enumerate(modality_values(slices)):
        _put(volume, i, values)
    volume.flags.writeable = False
    series = Series(
        modality=str(first.header.get("Modality", "")),
        volume=volume,
        spacing=(0.0, row_spacing, column_spacing),
        row_direction=row_dir,
        column_direction=col_dir,
        origin=(0.0, 0.0, 0.0),
        projection=True,
    )
    return LoadedSeries(
        series=series,
        headers=tuple(s.header for s in slices),
        placements=tuple(Placement(float(i)) for i in range(len(slices))),
        frames=tuple(s.frame for s in slices),
        excluded=excluded,
        assumed=(assumed,) if assumed else (),
    )


def _volume_dtype(name: str) -> np.dtype[np.float32] | np.dtype[np.int16]:
    if name == "float32":
        return np.dtype(np.float32)
    if name == "int16":
        return np.dtype(np.int16)
    raise VolumeError(f"a volume is float32 or int16, not {name!r}")


def _put(
    volume: VolumeArray,
    index: int,
    values: npt.NDArray[np.float32] | npt.NDArray[np.int16] | npt.NDArray[np.int32],
) -> None:
    """Slice ``index`` of ``volume`` is ``values``, rounded and clipped to an integer
    volume's range."""
    if volume.dtype == np.float32 or values.dtype == np.int16:
        volume[index] = values
    elif values.dtype == np.int32:
        limits = np.iinfo(np.int16)
        np.clip(values, limits.min, limits.max, out=volume[index], casting="unsafe")
    else:
        volume[index] = as_int16(cast("npt.NDArray[np.float32]", values))


def _fill(
    volume: VolumeArray,
    slices: list[Slice],
    shifts: npt.NDArray[np.float64] | None,
    grid_index: npt.NDArray[np.float64] | None,
) -> None:
    """``volume`` from ``slices`` (ordered along the normal), read one at a time:
    each shifted in plane by its ``shifts`` when sheared, and resampled onto the
    regular grid when they lie at fractional ``grid_index`` positions on it."""
    if volume.dtype == np.int16 and shifts is None and grid_index is None:
        # Whole numbers where the volume is integer and nothing is interpolated.
        for i, whole in enumerate(modality_values(slices, integer=True)):
            _put(volume, i, whole)
        return
    acquired = modality_values(slices)
    if shifts is not None:
        acquired = _unsheared(acquired, shifts)
    if grid_index is not None:
        _fill_resampled(volume, acquired, grid_index)
        return
    for i, values in enumerate(acquired):
        _put(volume, i, values)


def _unsheared(
    acquired: Iterator[npt.NDArray[np.float32]], shifts: npt.NDArray[np.float64]
) -> Iterator[npt.NDArray[np.float32]]:
    """Each slice shifted in plane by its ``shifts`` (rows, columns) onto the first,
    what comes in from outside its field of view at its lowest value."""
    for i, values in enumerate(acquired):
        if i == 0:
            yield values
            continue
        background = float(values.min())
        yield ndimage.shift(values, tuple(shifts[i]), order=1, mode="constant", cval=background)


def _fill_resampled(
    volume: VolumeArray,
    acquired: Iterator[npt.NDArray[np.float32]],
    index: npt.NDArray[np.float64],
) -> None:
    """The grid slices 0..len(volume)-1 from acquired slices at fractional grid
    positions ``index`` (increasing, from 0), each a linear blend of the two acquired
    slices either side, read in order with two of them in memory at once."""
    count = volume.shape[0]
    grid = 0
    previous: npt.NDArray[np.float32] | None = None
    for k, values in enumerate(acquired):
        while grid < count and grid <= index[k]:
            if previous is None:
                _put(volume, grid, values)
            else:
                weight = float((grid - index[k - 1]) / (index[k] - index[k - 1]))
                _put(volume, grid, (1.0 - weight) * previous + weight * values)
            grid += 1
        previous = values
    while grid < count and previous is not None:  # past the last acquired slice
        _put(volume, grid, previous)
        grid += 1
