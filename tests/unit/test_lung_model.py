"""The ct_lung_seg model's algorithm, run directly (its Triton wrapper is tested end to end)."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from types import ModuleType

import numpy as np
import numpy.typing as npt
import pytest

from infergate.inference.volume import load_series
from infergate.testing import ChestPhantom


def _volumes(labels: npt.NDArray[np.uint8], voxel_ml: float) -> list[float]:
    return [float((labels == k).sum()) * voxel_ml for k in (1, 2)]


def test_phantom_lungs_are_found_with_their_volumes(
    lung_model: ModuleType, small_phantom: ChestPhantom
) -> None:
    loaded = load_series(list(small_phantom.paths))
    hu = loaded.series.volume.astype(np.int16)
    labels = lung_model.segment_lungs(hu, np.array(loaded.series.spacing))
    right, left = _volumes(labels, loaded.series.voxel_volume_ml)
    # Label 1 has the smaller column index: the patient's right in this orientation.
    assert right == pytest.approx(small_phantom.right_lung_ml, rel=0.03)
    assert left == pytest.approx(small_phantom.left_lung_ml, rel=0.03)
    # The trachea is air inside the body, but not lung.
    assert set(np.unique(labels)) == {0, 1, 2}


def test_touching_lungs_are_split(lung_model: ModuleType) -> None:
    hu = np.full((30, 128, 128), -1000, dtype=np.int16)
    zz, yy, xx = np.mgrid[0:30, 0:128, 0:128]
    hu[((xx - 64) / 60.0) ** 2 + ((yy - 64) / 45.0) ** 2 <= 1] = 40
    right = ((xx - 40) / 18.0) ** 2 + ((yy - 64) / 28.0) ** 2 + ((zz - 15) / 13.0) ** 2 <= 1
    left = ((xx - 88) / 18.0) ** 2 + ((yy - 64) / 28.0) ** 2 + ((zz - 15) / 13.0) ** 2 <= 1
    bridge = (np.abs(xx - 64) <= 8) & (np.abs(yy - 64) <= 2) & (np.abs(zz - 15) <= 1)
    hu[right | left | bridge] = -850
    labels = lung_model.segment_lungs(hu, np.array([2.0, 2.0, 2.0]))
    assert set(np.unique(labels)) == {0, 1, 2}
    assert (labels[right] == 1).mean() > 0.97
    assert (labels[left] == 2).mean() > 0.97


def test_head_ct_has_no_lung_sized_air(lung_model: ModuleType, head_ct: list[Path]) -> None:
    loaded = load_series(head_ct)
    labels = lung_model.segment_lungs(
        loaded.series.volume.astype(np.int16), np.array(loaded.series.spacing)
    )
    # Sinus and mastoid air may be labelled; none of it is anywhere near a lung's size.
    assert max(_volumes(labels, loaded.series.voxel_volume_ml)) < 100.0


def test_empty_volume_gives_no_labels(lung_model: ModuleType) -> None:
    hu = np.full((4, 32, 32), -1000, dtype=np.int16)
    labels = lung_model.segment_lungs(hu, np.array([1.0, 1.0, 1.0]))
    assert labels.dtype == np.uint8
    assert not labels.any()


def test_the_model_holds_about_three_bytes_a_voxel_besides_its_input(
    lung_model: ModuleType, small_phantom: ChestPhantom
) -> None:
    """What segment_lungs allocates at its peak, counted by tracemalloc (numpy reports
    its arrays to it), for the phantom and for it twice over: what each voxel more
    costs is the component labels (2 bytes) and a mask (1) at once, not the 5 it took
    with each step's masks copied. (What does not grow with the volume, the counting
    slabs, drops out of the difference.)"""
    loaded = load_series(list(small_phantom.paths))
    hu = loaded.series.volume.astype(np.int16)
    spacing = np.array(loaded.series.spacing)

    def peak_of(volume: npt.NDArray[np.int16]) -> int:
        tracemalloc.start()
        try:
            lung_model.segment_lungs(volume, spacing, 1)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    once, twice = peak_of(hu), peak_of(np.concatenate([hu, hu]))
    per_voxel = (twice - once) / hu.size
    print(f"ct_lung_seg peak {once / 2**20:.1f} MiB, {per_voxel:.2f} bytes a voxel more")
    assert per_voxel < 3.5
