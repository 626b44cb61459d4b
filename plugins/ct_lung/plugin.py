"""The ct_lung plugin: the volume in HU to the model, two lungs and their volumes back."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import (
    ABSENT,
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
)

RIGHT_LUNG = 1
LEFT_LUNG = 2
# Below this a candidate is not an adult lung (air in sinuses, bowel, a pneumatocele).
MIN_LUNG_ML = 200.0

SPEC = PluginSpec(
    name="ct_lung",
    version="1.0.0",
    description="Left and right lung segmentation on chest CT by density and morphology",
    title="Lung segmentation",
    modalities=frozenset({"CT"}),
    model_name="ct_lung_seg",
    # Any CT but scout views: a head CT gets "lungs absent", which is an answer too.
    rule={
        "modality": ["CT"],
        "not": {
            "any": [
                {"image_type": ["LOCALIZER"]},
                {"series_description": "(?i)scout|localizer|topogram|surview"},
            ]
        },
    },
    inputs=(
        TensorSpec("CT_HU", "INT16", (-1, -1, -1)),
        TensorSpec("SPACING_MM", "FP32", (3,)),
    ),
    outputs=(TensorSpec("LUNG_LABELS", "UINT8", (-1, -1, -1)),),
    segments=(
        SegmentSpec(RIGHT_LUNG, "Right lung", ANATOMICAL_STRUCTURE, LUNG, laterality=RIGHT),
        SegmentSpec(LEFT_LUNG, "Left lung", ANATOMICAL_STRUCTURE, LUNG, laterality=LEFT),
    ),
)


class CtLungPlugin:
    """See the README beside this file for intended use and limits."""

    spec = SPEC

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        # int16 HU is half the bytes of float32 and loses nothing the model uses.
        hu = np.clip(np.rint(series.volume), -32768, 32767).astype(np.int16)
        spacing = np.asarray(series.spacing, dtype=np.float32)
        return {"CT_HU": hu, "SPACING_MM": spacing}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        labels = np.asarray(outputs["LUNG_LABELS"], dtype=np.uint8)
        if labels.shape != series.volume.shape:
            raise ValueError(f"LUNG_LABELS has shape {labels.shape}, volume {series.volume.shape}")
        # The model numbers lungs by column; the row direction says which is the patient's
        # left (+x in DICOM patient coordinates).
        columns_point_left = series.row_direction[0] >= 0
        first, second = (RIGHT_LUNG, LEFT_LUNG) if columns_point_left else (LEFT_LUNG, RIGHT_LUNG)
        label_map = np.zeros(labels.shape, dtype=np.uint8)
        measurements: list[Measurement] = []
        numbers: list[int] = []
        volumes: dict[str, float] = {}
        for model_label, segment in ((1, first), (2, second)):
            mask = labels == model_label
            volume_ml = float(mask.sum()) * series.voxel_volume_ml
            volumes[f"candidate_{model_label}_ml"] = round(volume_ml, 1)
            if volume_ml < MIN_LUNG_ML:
                continue
            label_map[mask] = segment
            numbers.append(segment)
            measurements.append(Measurement(segment, VOLUME, round(volume_ml, 1), MILLILITER))
        numbers.sort()
        measurements.sort(key=lambda m: m.segment_number or 0)
        evaluations: tuple[Evaluation, ...] = ()
        if not numbers:
            evaluations = (Evaluation(LUNG, ABSENT),)
        return Findings(
            label_map=label_map if numbers else None,
            segment_numbers=tuple(numbers),
            measurements=tuple(measurements),
            evaluations=evaluations,
            summary={"lungs_found": len(numbers), **volumes},
        )
