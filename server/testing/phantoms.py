"""Synthetic CT series with known ground truth, written as DICOM files.

The chest phantom is a soft-tissue body ellipse on a table, with two lungs of air
density (ellipsoids of different sizes, so laterality is testable), vessels inside
the lungs, and a trachea above them. Slices are written with shuffled Instance
Numbers and file names, so anything that orders by them instead of by position
along the normal gets the volume wrong.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

TISSUE_HU = 40
LUNG_HU = -850
AIR_HU = -1000
TABLE_HU = 250
VESSEL_HU = 50


@dataclass(frozen=True)
class PhantomIdentity:
    """Patient and visit identifiers written into the phantom, so tests can look for them."""

    patient_name: str = "PHANTOM^LUNGS^TESTCASE"
    patient_id: str = "PHI-ID-47110815"
    patient_birth_date: str = "19450704"
    accession_number: str = "ACC-PHI-2026"


@dataclass(frozen=True)
class ChestPhantom:
    """What was written, and the truth to compare results with."""

    directory: Path
    paths: tuple[Path, ...]
    study_uid: str
    series_uid: str
    sop_instance_uids: tuple[str, ...]
    right_lung_ml: float
    left_lung_ml: float
    identity: PhantomIdentity
    # What the truth is made from (``truth``): the shapes, the in-plane grid, and the
    # z of each instance (in the order of ``paths``) and the series' half-extent.
    geometry: ChestGeometry
    size: int
    pixel_spacing: float
    z_positions: tuple[float, ...]
    extent: float

    def truth(self, index: int) -> npt.NDArray[np.uint8]:
        """The lungs of instance ``index`` (of ``paths``): ``RIGHT_LUNG_LABEL``,
        ``LEFT_LUNG_LABEL``, 0 elsewhere, rows x columns, as written."""
        _, y, x = axial_grid(self.size, self.pixel_spacing, np.zeros(1))
        rng = np.random.default_rng(0)  # the noise of the HU, not of the truth
        z = self.z_positions[index]
        return chest_slice(self.geometry, x[0], y[0], z, extent=self.extent, rng=rng)[1]


def ellipsoid(
    grid: list[npt.NDArray[np.float64]],
    centre: tuple[float, float, float],
    semi_axes: tuple[float, float, float],
) -> npt.NDArray[np.bool_]:
    z, y, x = grid
    inside: npt.NDArray[np.bool_] = (
        ((x - centre[0]) / semi_axes[0]) ** 2
        + ((y - centre[1]) / semi_axes[1]) ** 2
        + ((z - centre[2]) / semi_axes[2]) ** 2
    ) <= 1.0
    return inside


def axial_grid(
    size: int, pixel_spacing: float, z_positions: npt.NDArray[np.float64]
) -> list[npt.NDArray[np.float64]]:
    """The (z, y, x) patient coordinates in mm of every voxel of an axial stack of
    ``size`` x ``size`` slices at ``z_positions``, centred on the patient's axis."""
    half_fov = size * pixel_spacing / 2.0
    coords = (np.arange(size) + 0.5) * pixel_spacing - half_fov
    return list(np.meshgrid(z_positions, coords, coords, indexing="ij"))


# Label values of a chest phantom's truth (those of the ct_lung plugin's segments).
RIGHT_LUNG_LABEL = 1
LEFT_LUNG_LABEL = 2


@dataclass(frozen=True)
class ChestGeometry:
    """The shapes of a chest phantom in patient coordinates (mm, LPS: x to the
    patient's left, y posterior, z head-ward, 0 at the series' middle); a lung's z
    semi-axis is a fraction of the series' half-extent along z. The defaults are
    :func:`write_chest_ct`'s; a training set varies them
    (``model_repository/ct_lung_unet/train``)."""

    body_axes: tuple[float, float] = (170.0, 120.0)
    table_y: tuple[float, float] = (135.0, 150.0)
    airway_centre_y: float = -40.0
    airway_radius: float = 9.0
    airway_from: float = 0.55  # the trachea above this fraction of the half-extent
    # centre (x, y, z), semi-axes (x, y, z as a fraction of the half-extent)
    right_lung: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (-70.0, -5.0, 0.0),
        (55.0, 80.0, 0.80),
    )
    left_lung: tuple[tuple[float, float, float], tuple[float, float, float]] = (
        (70.0, -5.0, -5.0),
        (48.0, 72.0, 0.72),
    )
    vessels: tuple[tuple[float, float, float], ...] = (
        (-70.0, 0.0, 20.0),
        (-60.0, -30.0, -30.0),
        (65.0, 10.0, 0.0),
    )
    vessel_radius: float = 5.0
    noise_hu: float = 15.0


def chest_slice(
    geometry: ChestGeometry,
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    z: float,
    *,
    extent: float,
    rng: np.random.Generator,
) -> tuple[npt.NDArray[np.int16], npt.NDArray[np.uint8]]:
    """One axial slice of the phantom at ``z`` (mm) on the in-plane grid ``x``, ``y``
    (:func:`axial_grid`), in a series of half-extent ``extent`` (mm), its noise drawn
    from ``rng``: its HU, and its truth (``RIGHT_LUNG_LABEL``,
    ``LEFT_LUNG_LABEL``, 0 elsewhere; a vessel inside a lung is lung)."""
    g = geometry
    body = (x / g.body_axes[0]) ** 2 + (y / g.body_axes[1]) ** 2 <= 1.0
    table = (np.abs(x) <= 200.0) & (y >= g.table_y[0]) & (y <= g.table_y[1])
    airway = x**2 + (y - g.airway_centre_y) ** 2 <= g.airway_radius**2
    plane = [np.full_like(x, z), y, x]
    hu = np.full(x.shape, AIR_HU, dtype=np.float64)
    hu[body] = TISSUE_HU
    hu[table] = TABLE_HU
    labels = np.zeros(x.shape, dtype=np.uint8)
    for label, ((cx, cy, cz), (ax, ay, az)) in (
        (RIGHT_LUNG_LABEL, g.right_lung),
        (LEFT_LUNG_LABEL, g.left_lung),
    ):
        inside = ellipsoid(plane, (cx, cy, cz), (ax, ay, az * extent))
        labels[inside] = label
        hu[inside] = LUNG_HU
    if z >= g.airway_from * extent:
        hu[airway & body] = AIR_HU
    radius = g.vessel_radius
    for cx, cy, cz in g.vessels:
        hu[ellipsoid(plane, (cx, cy, cz), (radius, radius, radius))] = VESSEL_HU
    hu += rng.normal(0.0, g.noise_hu, size=hu.shape)
    return np.clip(hu, -1024, 3000).astype(np.int16), labels


def write_chest_ct(
    directory: Path,
    *,
    slices: int = 100,
    size: int = 512,
    pixel_spacing: float = 0.7,
    slice_spacing: float = 2.5,
    seed: int = 7,
    identity: PhantomIdentity | None = None,
    geometry: ChestGeometry | None = None,
) -> ChestPhantom:
    """Write a synthetic chest CT series into ``directory`` and return its truth."""
    ident = identity or PhantomIdentity()
    shapes = geometry or ChestGeometry()
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    # Patient coordinates (LPS): x to the patient's left, y posterior, z head-ward.
    z_top = (slices - 1) * slice_spacing / 2.0
    z_positions = z_top - np.arange(slices) * slice_spacing
    # Built one slice at a time, so that a study of thousands of slices takes the
    # memory of its int16 volume alone.
    _, y, x = axial_grid(size, pixel_spacing, np.zeros(1))
    volume = np.empty((slices, size, size), dtype=np.int16)
    voxels = {RIGHT_LUNG_LABEL: 0, LEFT_LUNG_LABEL: 0}
    for index, z in enumerate(z_positions):
        volume[index], labels = chest_slice(shapes, x[0], y[0], float(z), extent=z_top, rng=rng)
        for label in voxels:
            voxels[label] += int((labels == label).sum())

    voxel_ml = pixel_spacing * pixel_spacing * slice_spacing / 1000.0
    written = write_axial_series(
        directory,
        volume,
        z_positions,
        pixel_spacing=pixel_spacing,
        slice_spacing=slice_spacing,
        identity=ident,
        rng=rng,
    )
    return ChestPhantom(
        directory=directory,
        paths=written.paths,
        study_uid=written.study_uid,
        series_uid=written.series_uid,
        sop_instance_uids=written.sop_instance_uids,
        right_lung_ml=voxels[RIGHT_LUNG_LABEL] * voxel_ml,
        left_lung_ml=voxels[LEFT_LUNG_LABEL] * voxel_ml,
        identity=ident,
        geometry=shapes,
        size=size,
        pixel_spacing=pixel_spacing,
        z_positions=tuple(float(z) for z in z_positions),
        extent=float(z_top),
    )


@dataclass(frozen=True)
class WrittenSeries:
    paths: tuple[Path, ...]
    study_uid: str
    series_uid: str
    sop_instance_uids: tuple[str, ...]


@dataclass(frozen=True)
class SeriesLabels:
    """What the headers say the series is."""

    body_part: str = "CHEST"
    study_description: str = "CHEST PHANTOM"
    series_description: str = "SYNTHETIC CHEST 2.5MM"
    window: tuple[int, int] = (-600, 1500)


def write_axial_series(
    directory: Path,
    volume: npt.NDArray[np.int16],
    z_positions: npt.NDArray[np.float64],
    *,
    pixel_spacing: float,
    slice_spacing: float,
    identity: PhantomIdentity,
    rng: np.random.Generator,
    labels: SeriesLabels | None = None,
) -> WrittenSeries:
    """Write ``volume`` (HU, slice x row x column, centred on the patient axis) as an
    axial CT series with shuffled Instance Numbers and file names."""
    slices, size = volume.shape[0], volume.shape[1]
    half_fov = size * pixel_spacing / 2.0
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    numbers = rng.permutation(slices) + 1
    paths: list[Path] = []
    uids: list[str] = []
    for index in range(slices):
        ds = _slice_dataset(identity, study_uid, series_uid, frame_uid, labels or SeriesLabels())
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = int(numbers[index])
        ds.ImagePositionPatient = [
            -half_fov + pixel_spacing / 2,
            -half_fov + pixel_spacing / 2,
            float(z_positions[index]),
        ]
        ds.SliceLocation = float(z_positions[index])
        ds.PixelSpacing = [pixel_spacing, pixel_spacing]
        ds.SliceThickness = slice_spacing
        ds.Rows = ds.Columns = size
        ds.PixelData = (volume[index].astype(np.int32) + 1024).astype(np.uint16).tobytes()
        path = directory / f"slice-{int(numbers[index]) * 7919 % 100003:06d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        uids.append(ds.SOPInstanceUID)
    return WrittenSeries(tuple(paths), study_uid, series_uid, tuple(uids))


def _slice_dataset(
    ident: PhantomIdentity, study: str, series: str, frame: str, labels: SeriesLabels
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ident.accession_number
    ds.Modality = "CT"
    ds.Manufacturer = "Infergate test phantom"
    ds.ReferringPhysicianName = "REFERRER^PHI"
    ds.StudyDescription = labels.study_description
    ds.SeriesDescription = labels.series_description
    ds.PatientName = ident.patient_name
    ds.PatientID = ident.patient_id
    ds.PatientBirthDate = ident.patient_birth_date
    ds.PatientSex = "O"
    ds.BodyPartExamined = labels.body_part
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.StudyID = "1"
    ds.SeriesNumber = 3
    ds.AcquisitionNumber = 1
    ds.FrameOfReferenceUID = frame
    ds.PositionReferenceIndicator = ""
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = -1024
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = labels.window
    return ds
