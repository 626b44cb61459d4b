"""The ct_head_bleed plugin: head CT in HU to the model, candidate hyperdensities back.

Each candidate becomes a segment of the SEG, with its volume and its side in the SR;
the series gets a qualitative "Hemorrhage: present / absent". When a
candidate is present the results are urgent.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import (
    ABSENT,
    ACQUIRED_IMAGES,
    BILATERAL,
    BRAIN,
    HEMORRHAGE,
    LATERALITY,
    LEFT,
    MILLILITER,
    MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
    PRESENT,
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
    dicom_code,
)

MAX_CANDIDATES = 8
# A candidate with at least this fraction of its voxels on each side of the midline
# is on both sides.
BOTH_SIDES_FRACTION = 0.2
# Denser than this is the head (scalp, bone, brain), not air or the headrest's foam.
HEAD_HU = -300.0

SPEC = PluginSpec(
    name="ct_head_bleed",
    version="1.0.0",
    description="Head CT triage: candidate intracranial hyperdensities of blood density",
    title="Head CT hemorrhage triage",
    modalities=frozenset({"CT"}),
    model_name="ct_head_bleed",
    # Head CTs (by body part or description), not scout views; triage is urgent.
    rule={
        "modality": ["CT"],
        "all": [ACQUIRED_IMAGES],  # no dose screen, no reformat
        "any": [
            {"body_part": ["HEAD", "BRAIN", "SKULL"]},
            {"series_description": r"(?i)\b(head|brain|cranial|skull|cerebr)"},
        ],
        "not": {
            "any": [
                {"image_type": ["LOCALIZER"]},
                {"series_description": "(?i)scout|localizer|topogram|surview"},
            ]
        },
    },
    priority="urgent",
    inputs=(
        TensorSpec("CT_HU", "INT16", (-1, -1, -1)),
        TensorSpec("SPACING_MM", "FP32", (3,)),
    ),
    volume_type="int16",
    outputs=(TensorSpec("CANDIDATE_LABELS", "UINT8", (-1, -1, -1), shape_of="CT_HU"),),
    segments=tuple(
        SegmentSpec(
            number,
            f"Hyperdense candidate {number}",
            MORPHOLOGICALLY_ABNORMAL_STRUCTURE,
            HEMORRHAGE,
            site=BRAIN,
        )
        for number in range(1, MAX_CANDIDATES + 1)
    ),
    procedure=dicom_code("LN", "HeadCT"),
)


def _patient_x(series: Series, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
    """The patient x coordinate (LPS: towards the patient's left) of each voxel of ``mask``."""
    z, r, c = np.nonzero(mask)
    dz, dy, dx = series.spacing
    normal = np.cross(series.row_direction, series.column_direction)
    x: npt.NDArray[np.float64] = (
        series.origin[0]
        + z * dz * normal[0]
        + r * dy * series.column_direction[0]
        + c * dx * series.row_direction[0]
    )
    return x


def _interpolated_only(
    series: Series, labels: npt.NDArray[np.uint8], numbers: list[int]
) -> set[int]:
    """The candidates of ``numbers`` that lie only in interpolated slices."""
    if not any(series.interpolated):
        return set()
    acquired = ~np.asarray(series.interpolated, dtype=bool)
    seen = np.unique(labels[acquired])
    return {n for n in numbers if n not in seen}


class CtHeadBleedPlugin:
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
        labels = np.asarray(outputs["CANDIDATE_LABELS"], dtype=np.uint8)
        if labels.shape != series.volume.shape:
            raise ValueError(
                f"CANDIDATE_LABELS has shape {labels.shape}, volume {series.volume.shape}"
            )
        numbers = [int(n) for n in np.unique(labels) if 0 < n <= MAX_CANDIDATES]
        # A candidate in no acquired slice (all of it in slices blended across a wide
        # gap) is interpolation's partial-volume brightness, not what the scanner saw:
        # not a finding, least of all an urgent one.
        blended = _interpolated_only(series, labels, numbers)
        numbers = [n for n in numbers if n not in blended]
        if not numbers:
            return Findings(
                evaluations=(Evaluation(HEMORRHAGE, ABSENT),),
                summary={"candidates": 0, "interpolated_only": len(blended)},
            )
        head = series.volume > HEAD_HU
        midline = float(np.median(_patient_x(series, head))) if head.any() else 0.0
        measurements: list[Measurement] = []
        evaluations = [Evaluation(HEMORRHAGE, PRESENT, critical=True)]  # a person must know now
        volumes: dict[str, float | str] = {}
        for number in numbers:
            mask = labels == number
            volume_ml = round(float(mask.sum()) * series.voxel_volume_ml, 2)
            measurements.append(Measurement(number, VOLUME, volume_ml, MILLILITER))
            left = float(np.mean(_patient_x(series, mask) > midline))
            if min(left, 1.0 - left) >= BOTH_SIDES_FRACTION:
                side = BILATERAL
            else:
                side = LEFT if left > 0.5 else RIGHT
            evaluations.append(Evaluation(LATERALITY, side, number))
            volumes[f"candidate_{number}_ml"] = volume_ml
            volumes[f"candidate_{number}_side"] = side.meaning
        label_map = np.where(np.isin(labels, numbers), labels, 0).astype(np.uint8)
        return Findings(
            label_map=label_map,
            segment_numbers=tuple(numbers),
            measurements=tuple(measurements),
            evaluations=tuple(evaluations),
            summary={
                "candidates": len(numbers),
                "interpolated_only": len(blended),
                "total_ml": round(sum(m.value for m in measurements), 2),
                **volumes,
            },
            urgent=True,
        )
