"""Variants of the synthetic series that scanners produce: sheared, gappy, mixed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from infergate.testing import ChestPhantom


def rewrite(paths: list[Path], folder: Path, change: Callable[[int, Dataset], None]) -> list[Path]:
    """Copies of ``paths`` in ``folder``, each changed by ``change(index, dataset)``."""
    folder.mkdir(exist_ok=True)
    written = []
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(index, ds)
        target = folder / f"{index:03d}.dcm"
        ds.save_as(target)
        written.append(target)
    return written


def by_z(paths: tuple[Path, ...]) -> list[Path]:
    return sorted(paths, key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))


def sheared(small_phantom: ChestPhantom, folder: Path) -> list[Path]:
    """The phantom as a tilted gantry acquires it: axial slices, each moved one more
    row along +y than the one below, its content moved with it (a 13 degree tilt)."""
    paths = by_z(small_phantom.paths)

    def tilt(index: int, ds: Dataset) -> None:
        pixels = ds.pixel_array
        moved = np.full_like(pixels, pixels[0, 0])
        moved[: pixels.shape[0] - index] = pixels[index:]
        ds.PixelData = moved.tobytes()
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + index * float(ds.PixelSpacing[0]), z]
        ds.GantryDetectorTilt = 13.1

    return rewrite(paths, folder, tilt)
