"""A synthetic head CT with hyperdense (blood-density) regions of known volume.

Scalp, a bone skull, brain of grey/white-matter density with two CSF ventricles,
and noise as a scanner has it. Each inserted region is an ellipsoid at acute-blood
density; its volume, its side and its centre are the truth a triage plugin is
checked against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from infergate.testing.phantoms import (
    AIR_HU,
    PhantomIdentity,
    SeriesLabels,
    axial_grid,
    ellipsoid,
    write_axial_series,
)

SCALP_HU = 45
BONE_HU = 900
BRAIN_HU = 33
CSF_HU = 6
BLOOD_HU = 68
HEAD_LABELS = SeriesLabels(
    body_part="HEAD",
    study_description="HEAD PHANTOM",
    series_description="SYNTHETIC HEAD 5MM",
    window=(40, 80),
)


@dataclass(frozen=True)
class Hyperdensity:
    """An ellipsoid of blood density: centre (x, y, z) and semi-axes in mm, LPS."""

    centre: tuple[float, float, float]
    semi_axes: tuple[float, float, float]
    hu: float = BLOOD_HU


# A right parietal intraparenchymal bleed of ~4 mL and a small left frontal one.
RIGHT_PARIETAL = Hyperdensity((-32.0, 15.0, 25.0), (13.0, 11.0, 9.0))
LEFT_FRONTAL = Hyperdensity((28.0, -40.0, 10.0), (8.0, 8.0, 7.0))


@dataclass(frozen=True)
class HeadPhantom:
    directory: Path
    paths: tuple[Path, ...]
    study_uid: str
    series_uid: str
    sop_instance_uids: tuple[str, ...]
    # The inserted regions' volumes as voxelised (mL), in the order given.
    hyperdensity_ml: tuple[float, ...]
    identity: PhantomIdentity


def write_head_ct(
    directory: Path,
    hyperdensities: tuple[Hyperdensity, ...] = (),
    *,
    slices: int = 32,
    size: int = 256,
    pixel_spacing: float = 0.9,
    slice_spacing: float = 5.0,
    noise_hu: float = 5.0,
    seed: int = 11,
    identity: PhantomIdentity | None = None,
    air_filled: bool = False,
) -> HeadPhantom:
    """Write a synthetic axial head CT into ``directory`` and return its truth;
    ``air_filled``: a skull phantom's, air inside the bone (no brain)."""
    ident = identity or PhantomIdentity()
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    z_top = 75.0
    z_positions = z_top - np.arange(slices) * slice_spacing
    grid = axial_grid(size, pixel_spacing, z_positions)

    volume = np.full((slices, size, size), AIR_HU, dtype=np.float64)
    centre = (0.0, 0.0, 0.0)
    volume[ellipsoid(grid, centre, (78.0, 98.0, 95.0))] = SCALP_HU
    volume[ellipsoid(grid, centre, (73.0, 93.0, 90.0))] = BONE_HU
    brain = ellipsoid(grid, centre, (66.0, 86.0, 83.0))
    volume[brain] = AIR_HU if air_filled else BRAIN_HU
    for x in () if air_filled else (-9.0, 9.0):
        volume[ellipsoid(grid, (x, -5.0, 15.0), (5.0, 22.0, 12.0))] = CSF_HU
    voxel_ml = pixel_spacing * pixel_spacing * slice_spacing / 1000.0
    truth = []
    for region in hyperdensities:
        inside = ellipsoid(grid, region.centre, region.semi_axes) & brain
        volume[inside] = region.hu
        truth.append(float(inside.sum()) * voxel_ml)
    volume += rng.normal(0.0, noise_hu, size=volume.shape)
    hu = np.clip(np.rint(volume), -1024, 3000).astype(np.int16)
    written = write_axial_series(
        directory,
        hu,
        z_positions,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        identity=ident,
        rng=rng,
        labels=HEAD_LABELS,
    )
    return HeadPhantom(
        directory=directory,
        paths=written.paths,
        study_uid=written.study_uid,
        series_uid=written.series_uid,
        sop_instance_uids=written.sop_instance_uids,
        hyperdensity_ml=tuple(truth),
        identity=ident,
    )
