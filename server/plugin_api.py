"""The plugin contract, version 1: the only module a plugin imports.

A plugin is an object with a frozen :class:`PluginSpec` and two pure functions.
``preprocess`` turns a :class:`Series` into the named arrays the Triton model
takes; ``postprocess`` turns the model's named outputs into :class:`Findings`.
The server does every side effect: reading DICOM, talking to Triton, encoding
and sending results. A plugin never touches the network, the disk or DICOM.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast, runtime_checkable

import numpy as np
import numpy.typing as npt

# Coded concepts, from pydicom's dictionary (DICOM PS3.16) through infergate.codes: a
# plugin names the ones it needs by keyword, dicom_code("SCT", "Lung"), or takes these.
from infergate.codes import (
    ABSENT,
    ANATOMICAL_STRUCTURE,
    BILATERAL,
    BRAIN,
    FINDING,
    HEMORRHAGE,
    IMAGING_PROCEDURE,
    LATERALITY,
    LEFT,
    LUNG,
    MILLILITER,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    NO_UNITS,
    PERCENT,
    PRESENT,
    PRIVATE_SCHEME,
    RIGHT,
    VOLUME,
    Code,
    dicom_code,
    listed_code,
)

__all__ = [
    "ABSENT",
    "ACQUIRED_IMAGES",
    "ANATOMICAL_STRUCTURE",
    "API_VERSION",
    "BILATERAL",
    "BRAIN",
    "FINDING",
    "HEMORRHAGE",
    "IMAGING_PROCEDURE",
    "LATERALITY",
    "LEFT",
    "LUNG",
    "MILLILITER",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "NO_UNITS",
    "PERCENT",
    "PRESENT",
    "PRIVATE_SCHEME",
    "RIGHT",
    "VOLUME",
    "Code",
    "Evaluation",
    "Findings",
    "Measurement",
    "Plugin",
    "PluginSpec",
    "SegmentSpec",
    "Series",
    "TensorSpec",
    "TritonDatatype",
    "VolumeArray",
    "as_int16",
    "dicom_code",
    "listed_code",
]

API_VERSION = 1

# A test for a rule (``PluginSpec.rule``, ``{"all": [ACQUIRED_IMAGES], ...}``): images
# the examination itself made. Image Type PRIMARY: an ORIGINAL image, or one a lossy
# compression has since marked DERIVED (DCMTK's dcmcjpeg does, PS3.3 C.7.6.1.1.2);
# not SECONDARY images a scanner or workstation adds afterwards (dose screens, screen
# saves), not localizers, not reformats or projections (MPR, MIP). A plugin that ships
# no rule runs on these images of its modalities.
ACQUIRED_IMAGES: dict[str, object] = {
    "image_type": ["PRIMARY"],
    "not": {
        "any": [
            {"image_type": [value]}
            for value in ("SECONDARY", "LOCALIZER", "REFORMATTED", "MPR", "MIP", "PROJECTION IMAGE")
        ]
    },
}

TritonDatatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64"
]


@dataclass(frozen=True)
class TensorSpec:
    """A Triton model input or output. ``-1`` in ``shape`` means any size.

    ``shape_of`` (an output): the name of the input whose shape it has (a label map of
    the volume). Known before the model runs, it is written by Triton straight into
    the job's shared memory instead of coming back inside the gRPC response."""

    name: str
    datatype: TritonDatatype
    shape: tuple[int, ...]
    shape_of: str | None = None


@dataclass(frozen=True)
class SegmentSpec:
    """A segment a plugin can produce; ``number`` is its value in the label map."""

    number: int
    label: str
    category: Code
    type: Code
    algorithm_type: Literal["AUTOMATIC", "SEMIAUTOMATIC"] = "AUTOMATIC"
    # Where in the body the segment is (the SEG's anatomic region, the SR's finding
    # site); None: ``type`` is the anatomy itself (an organ segmentation).
    site: Code | None = None
    # The side of a paired organ (RIGHT, LEFT, BILATERAL): the SEG's property type
    # modifier and the laterality of the SR's finding site (a right lung is LUNG, RIGHT).
    laterality: Code | None = None


@dataclass(frozen=True)
class PluginSpec:
    """What a plugin is, what it accepts, which model it calls and what it produces."""

    name: str
    version: str
    description: str
    modalities: frozenset[str]
    model_name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    segments: tuple[SegmentSpec, ...] = ()
    model_version: str = ""
    # The procedure the report is about (TID 1500 "Procedure reported").
    procedure: Code = IMAGING_PROCEDURE
    api_version: int = API_VERSION
    # The series the plugin runs on unless a rule in routing.rules names it: a mapping
    # as in a rule's ``when`` (modality, image_type, series_description, not, ...).
    # None: every series of one of ``modalities``.
    rule: Mapping[str, object] | None = field(default=None, hash=False)
    # The priority of its jobs under that default rule (a triage plugin: urgent).
    priority: Literal["urgent", "normal"] = "normal"
    # How long one inference may take before the job fails (a hung model); None:
    # triton.request_timeout_s.
    deadline_s: float | None = None
    # The model computes each slice (first axis) without the others: over plain gRPC
    # the volume may go as chunks of this many slices, several requests in flight,
    # the outputs joined along their first axis. None: always one request.
    slice_chunk: int | None = None
    # What a radiologist reads in the viewer's series list: the result's subject in
    # words ("Lung segmentation"); "" : the plugin's name.
    title: str = ""
    # Not cleared for clinical use (a reference or research plugin): the results'
    # series descriptions say so. A plugin its makers cleared sets it False.
    investigational: bool = True
    # The array type of ``Series.volume``: "float32", or "int16" (values rounded and
    # clipped to its range: Hounsfield units lose nothing), half the memory, which a
    # plugin whose model takes int16 hands to it as it is, not copied.
    volume_type: Literal["float32", "int16"] = "float32"
    # Runs only where plugins.enabled lists it, not on every installed plugin's
    # default: a second model for a task another plugin does by default (a trained
    # network beside the heuristic one), which would give each series both results.
    opt_in: bool = False

    def series_description(self, kind: str) -> str:
        """The Series Description of its results of ``kind`` ("SEG", "SR"): that they
        come from an algorithm, what about and, unless cleared, not for clinical use;
        at most 64 characters (LO)."""
        subject = self.title or self.name
        caveat = ", not for clinical use" if self.investigational else ""
        suffix = f" (AI {kind}{caveat})"
        return subject[: 64 - len(suffix)] + suffix

    def segment(self, number: int) -> SegmentSpec:
        for seg in self.segments:
            if seg.number == number:
                return seg
        raise KeyError(f"plugin {self.name} declares no segment {number}")


# A volume's array: float32, or int16 (PluginSpec.volume_type).
VolumeArray = npt.NDArray[np.float32] | npt.NDArray[np.int16]


def as_int16(volume: VolumeArray) -> npt.NDArray[np.int16]:
    """``volume`` as int16: itself, not a copy, when it is (``volume_type="int16"``),
    else rounded and clipped to int16's range."""
    if volume.dtype == np.int16:
        return cast("npt.NDArray[np.int16]", volume)
    limits = np.iinfo(np.int16)
    return np.clip(np.rint(volume), limits.min, limits.max).astype(np.int16)


@dataclass(frozen=True)
class Series:
    """A series as a volume, in patient geometry, with no patient data.

    ``volume`` is indexed (slice, row, column), slices ordered along the slice
    normal, values after the modality LUT (Hounsfield units for CT), of the plugin's
    ``PluginSpec.volume_type``. It is read-only to the plugin: it may lie in memory
    the model reads it from.

    A series of projection images (CR, DX: no Image Position) has ``projection``
    set: each slice is one image, in Instance Number order, not stacked in space;
    ``spacing[0]`` is 0; values are as displayed, brighter is higher (MONOCHROME1
    images are inverted onto that scale); the row and column directions come from
    Patient Orientation, and ``origin`` is (0, 0, 0).
    """

    modality: str
    volume: VolumeArray
    # Distance between slice centres along the normal, then row and column spacing, in mm.
    spacing: tuple[float, float, float]
    # Direction cosines of the rows and of the columns (ImageOrientationPatient).
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    # ImagePositionPatient of the first slice, in mm.
    origin: tuple[float, float, float]
    projection: bool = False
    # A volume resampled along the normal (uneven gaps between acquired slices): for
    # each slice, True when no acquired slice lies there, its values blended from the
    # acquired slices either side. Empty when every slice was acquired. A finding that
    # lies only in such slices is what interpolation made, not what the scanner saw.
    interpolated: tuple[bool, ...] = ()

    @property
    def voxel_volume_ml(self) -> float:
        dz, dy, dx = self.spacing
        return dz * dy * dx / 1000.0


@dataclass(frozen=True)
class Measurement:
    """A numeric measurement (TID 1500 measurement): of a segment, of one image
    (``image_index``, the slice of the volume it is about), or of the series (neither)."""

    segment_number: int | None
    name: Code
    value: float
    unit: Code
    image_index: int | None = None


@dataclass(frozen=True)
class Evaluation:
    """A qualitative finding about a segment, about one image (``image_index``, the
    slice of the volume it is about), or about the series (neither)."""

    name: Code
    value: Code
    segment_number: int | None = None
    image_index: int | None = None
    # A finding a person must hear of now (a bleed present): besides the DICOM results,
    # a notification goes to each of ``notifications.receivers``, once per finding.
    critical: bool = False


@dataclass(frozen=True)
class Findings:
    """What a plugin found. ``label_map`` (uint8, same shape as the volume) holds segments."""

    label_map: npt.NDArray[np.uint8] | None = None
    segment_numbers: tuple[int, ...] = ()
    measurements: tuple[Measurement, ...] = ()
    evaluations: tuple[Evaluation, ...] = ()
    summary: Mapping[str, float | int | str] = field(default_factory=dict)
    # A finding that cannot wait (a bleed): the results go out ahead of others, and
    # are sent with C-STORE priority HIGH.
    urgent: bool = False


@runtime_checkable
class Plugin(Protocol):
    """The interface every plugin implements."""

    @property
    def spec(self) -> PluginSpec: ...

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]: ...

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings: ...
