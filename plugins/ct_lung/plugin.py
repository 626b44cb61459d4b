"""The ct_lung plugin: the volume in HU to the model, two lungs and their volumes back."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import (
    ABSENT,
    ACQUIRED_IMAGES,
    ANATOMICAL_STRUCTURE,
    LEFT,
    LUNG,
    MILLILITER,
    RIGHT,
    VOLUME,
    Evaluation,
    Findings,
    Measurement,
    PluginSpec,
    SegmentSpec,
    Series,
    TensorSpec,
    as_int16,
)

RIGHT_LUNG = 1
LEFT_LUNG = 2
# Below this a candidate is not an adult lung (air in sinuses, bowel, a pneumatocele).
MIN_LUNG_ML = 200.0
# Plausibility by anatomy and position, not volume alone: a lung lies in a thorax,
# whose width at the lung's rows is an adult's (a head is at most ~170 mm across) ...
MIN_THORAX_WIDTH_MM = 200.0
BODY_HU = -500.0
# ... and to one side of the body's midline: its centre at least this fraction of the
# body's width away from the body's centre (a lung's is about a quarter; the air of a
# skull phantom, or of a stomach, is centred).
MIN_LUNG_OFFSET = 0.08

# Acquired axial CT of the chest: by Body Part Examined or, where a scanner leaves that
# empty, the series description; not derived images (a dose screen, a reformat) nor
# scout views. A hospital's own rule (routing.rules) may say otherwise.
CHEST_CT_RULE: dict[str, object] = {
    "modality": ["CT"],
    "orientation": ["axial"],
    "all": [ACQUIRED_IMAGES],
    "any": [
        {"body_part": ["CHEST", "THORAX", "LUNG", "CHESTABDOMEN", "CHESTABDPELVIS"]},
        {"series_description": r"(?i)\b(chest|thorax|thoracic|lung|pulmonary)"},
    ],
    "not": {
        "any": [
            {"image_type": ["LOCALIZER"]},
            {"series_description": "(?i)scout|localizer|topogram|surview"},
        ]
    },
}
LUNG_SEGMENTS = (
    SegmentSpec(RIGHT_LUNG, "Right lung", ANATOMICAL_STRUCTURE, LUNG, laterality=RIGHT),
    SegmentSpec(LEFT_LUNG, "Left lung", ANATOMICAL_STRUCTURE, LUNG, laterality=LEFT),
)

SPEC = PluginSpec(
    name="ct_lung",
    version="1.0.0",
    description="Left and right lung segmentation on chest CT by density and morphology",
    title="Lung segmentation",
    modalities=frozenset({"CT"}),
    model_name="ct_lung_seg",
    rule=CHEST_CT_RULE,
    inputs=(
        TensorSpec("CT_HU", "INT16", (-1, -1, -1)),
        TensorSpec("SPACING_MM", "FP32", (3,)),
    ),
    volume_type="int16",
    outputs=(TensorSpec("LUNG_LABELS", "UINT8", (-1, -1, -1), shape_of="CT_HU"),),
    segments=LUNG_SEGMENTS,
)


class CtLungPlugin:
    """See the README beside this file for intended use and limits."""

    spec = SPEC

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        # The volume is int16 HU (volume_type), as the model takes it: handed over as
        # it is, not copied.
        hu = as_int16(series.volume)
        return {"CT_HU": hu, "SPACING_MM": np.asarray(series.spacing, dtype=np.float32)}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        labels = np.asarray(outputs["LUNG_LABELS"], dtype=np.uint8)
        if labels.shape != series.volume.shape:
            raise ValueError(f"LUNG_LABELS has shape {labels.shape}, volume {series.volume.shape}")
        return lung_findings(series, labels)


def lung_findings(series: Series, labels: npt.NDArray[np.uint8]) -> Findings:
    """The lungs among a model's two candidates (``labels`` 1 and 2, the volume's
    shape), each by its own position, and their volumes: the findings of every lung
    model that labels candidates as ``ct_lung_seg`` does (``ct_lung_unet`` too)."""
    # The row direction says which way the columns run: towards the patient's left
    # (+x in DICOM patient coordinates) or right.
    columns_point_left = series.row_direction[0] >= 0
    summary: dict[str, float | int | str] = {}
    lungs: dict[int, int] = {}  # model label -> the lung it is
    voxels = {RIGHT_LUNG: 0, LEFT_LUNG: 0}
    for model_label in (1, 2):
        mask = labels == model_label
        count = int(np.count_nonzero(mask))
        volume_ml = count * series.voxel_volume_ml
        summary[f"candidate_{model_label}_ml"] = round(volume_ml, 1)
        if volume_ml < MIN_LUNG_ML:
            continue
        offset, width_mm = _lateral_position(series, mask)
        del mask  # before the next one is made
        if width_mm < MIN_THORAX_WIDTH_MM:
            summary[f"candidate_{model_label}_not_a_lung"] = "body too narrow for a thorax"
            continue
        if abs(offset) < MIN_LUNG_OFFSET:
            summary[f"candidate_{model_label}_not_a_lung"] = "on the body's midline"
            continue
        # Its side, each candidate by its own position: a single lung is labelled
        # by the side it is on, and two parts of one lung are that lung.
        on_left = (offset > 0) == columns_point_left
        lungs[model_label] = LEFT_LUNG if on_left else RIGHT_LUNG
        voxels[lungs[model_label]] += count
    numbers = tuple(n for n, count in voxels.items() if count)
    measurements = tuple(
        Measurement(n, VOLUME, round(float(voxels[n]) * series.voxel_volume_ml, 1), MILLILITER)
        for n in numbers
    )
    evaluations: tuple[Evaluation, ...] = () if numbers else (Evaluation(LUNG, ABSENT),)
    return Findings(
        label_map=_relabelled(labels, lungs) if numbers else None,
        segment_numbers=numbers,
        measurements=measurements,
        evaluations=evaluations,
        summary={"lungs_found": len(numbers), **summary},
    )


def _relabelled(labels: npt.NDArray[np.uint8], lungs: Mapping[int, int]) -> npt.NDArray[np.uint8]:
    """The label map of the lungs: each model label of ``lungs`` as its lung, every
    other voxel 0; a copy of ``labels`` (which may lie in memory let go after the
    postprocess), made by copying when the model's labels are the lungs' already."""
    if lungs == {RIGHT_LUNG: RIGHT_LUNG, LEFT_LUNG: LEFT_LUNG} and int(labels.max()) <= 2:
        return labels.copy()
    label_map = np.zeros(labels.shape, dtype=np.uint8)
    for model_label, lung in lungs.items():
        np.copyto(label_map, np.uint8(lung), where=labels == model_label)
    return label_map


def _lateral_position(series: Series, mask: npt.NDArray[np.bool_]) -> tuple[float, float]:
    """Where the candidate ``mask`` lies across the body, in the slices and rows it
    spans (no table there): its centre's distance from the body's centre in columns,
    as a fraction of the body's width (negative: towards column 0), and that width
    in mm."""
    rows_by_slice = mask.any(axis=2)
    slices = np.nonzero(rows_by_slice.any(axis=1))[0]
    rows = np.nonzero(rows_by_slice.any(axis=0))[0]
    # Its voxels per column, summed over slices first (a sum along the first axis
    # runs over whole rows of memory; in uint16 or uint32, enough for every slice).
    wide = np.uint16 if mask.shape[0] < 2**16 else np.uint32
    per_column = np.add.reduce(mask.view(np.uint8), axis=0, dtype=wide).sum(axis=0, dtype=np.int64)
    # The body's columns, a slice at a time (no mask of the body the size of the volume).
    occupied = per_column > 0
    for index in range(slices[0], slices[-1] + 1):
        occupied |= (series.volume[index, rows[0] : rows[-1] + 1] > BODY_HU).any(axis=0)
    columns = np.nonzero(occupied)[0]
    first, last = int(columns[0]), int(columns[-1])
    width = last - first + 1
    centre = (first + last) / 2.0
    # The mean column of its voxels, from their count per column (no index arrays).
    candidate_centre = float(per_column @ np.arange(per_column.size)) / float(per_column.sum())
    return (candidate_centre - centre) / width, width * series.spacing[2]
