"""The cxr_quality plugin: chest radiographs to the model, quality findings back.

Findings are about each image, never a region: no SEG, an SR whose measurement groups
each reference the image they are about. For each image: grayscale inverted against
its Photometric Interpretation, patient rotation, and exposure clipping in the lung
fields, each present or absent, with the rotation index and the clipped percentage
as measurements, and the image's quality as meeting the standard or not.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from infergate.plugin_api import (
    ABSENT,
    LUNG,
    NO_UNITS,
    PERCENT,
    PRESENT,
    PRIVATE_SCHEME,
    Code,
    Evaluation,
    Findings,
    Measurement,
    PluginSpec,
    Series,
    TensorSpec,
    dicom_code,
    listed_code,
)

# Concepts no public coding scheme has are Infergate's private codes (infergate.codes).
INVERTED_GRAYSCALE = listed_code(PRIVATE_SCHEME, "IG-INVERTED")
EXPOSURE_CLIPPING = listed_code(PRIVATE_SCHEME, "IG-CLIPPED")
ROTATION_INDEX = listed_code(PRIVATE_SCHEME, "IG-ROTIDX")
CLIPPED_PERCENT = listed_code(PRIVATE_SCHEME, "IG-CLIPPCT")
POSITIONING = dicom_code("DCM", "Positioning")
IMAGE_QUALITY = dicom_code("DCM", "ImageQuality")
MEETS_STANDARD = dicom_code("DCM", "UsableMeetsTheQualityControlStandard")
FAILS_STANDARD = dicom_code("DCM", "UsableDoesNotMeetTheQualityControlStandard")

# Decision thresholds on the model's outputs (see the model card).
INVERSION_MARGIN = 0.05  # |score| below this: the check cannot tell
MAX_ROTATION_INDEX = 0.1
MAX_CLIPPED_FRACTION = 0.01

SPEC = PluginSpec(
    name="cxr_quality",
    version="1.0.0",
    description="Chest radiograph quality: inverted grayscale, rotation, exposure clipping",
    title="Chest radiograph quality",
    modalities=frozenset({"CR", "DX"}),
    model_name="cxr_quality",
    # Frontal chest radiographs: chest by body part or description, not a lateral view.
    rule={
        "modality": ["CR", "DX"],
        "any": [
            {"body_part": ["CHEST", "THORAX", "LUNG"]},
            {"series_description": r"(?i)\b(chest|thorax|cxr|lung)"},
        ],
        "not": {"series_description": r"(?i)\b(lat|lateral)\b"},
    },
    inputs=(TensorSpec("IMAGE", "FP32", (-1, -1, -1)),),
    outputs=(
        TensorSpec("INVERSION_SCORE", "FP32", (-1,)),
        TensorSpec("ROTATION_INDEX", "FP32", (-1,)),
        TensorSpec("CLIPPED_FRACTION", "FP32", (-1,)),
    ),
    procedure=listed_code("SCT", "399208008"),  # Plain chest X-ray
    # Each image is checked alone: over gRPC, a series of images goes one per request.
    slice_chunk=1,
)


def _present(flag: bool) -> Code:
    return PRESENT if flag else ABSENT


class CxrQualityPlugin:
    """See the README beside this file for intended use and limits."""

    spec = SPEC

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        return {"IMAGE": np.ascontiguousarray(series.volume, dtype=np.float32)}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        images = series.volume.shape[0]
        values = {}
        for tensor in SPEC.outputs:
            array = np.asarray(outputs[tensor.name], dtype=np.float64).reshape(-1)
            if array.shape != (images,):
                raise ValueError(f"{tensor.name} has {array.size} values for {images} images")
            values[tensor.name] = array
        evaluations: list[Evaluation] = []
        measurements: list[Measurement] = []
        summary: dict[str, float | int | str] = {"images": images}
        failing = 0
        for index in range(images):
            problems, checked = self._image(index, values, evaluations, measurements, summary)
            failing += problems > 0
            if problems or checked:
                quality = FAILS_STANDARD if problems else MEETS_STANDARD
                evaluations.append(Evaluation(IMAGE_QUALITY, quality, image_index=index))
        summary["failing_images"] = failing
        return Findings(
            evaluations=tuple(evaluations), measurements=tuple(measurements), summary=summary
        )

    @staticmethod
    def _image(
        index: int,
        values: Mapping[str, npt.NDArray[np.float64]],
        evaluations: list[Evaluation],
        measurements: list[Measurement],
        summary: dict[str, float | int | str],
    ) -> tuple[int, bool]:
        """Add image ``index``'s findings; return its problem count and whether every
        check could be made."""
        problems = 0
        score = float(values["INVERSION_SCORE"][index])
        rotation = float(values["ROTATION_INDEX"][index])
        clipped = float(values["CLIPPED_FRACTION"][index])
        inversion_known = not math.isnan(score) and abs(score) >= INVERSION_MARGIN
        if inversion_known:
            inverted = score > 0
            problems += inverted
            evaluations.append(
                Evaluation(INVERTED_GRAYSCALE, _present(inverted), image_index=index)
            )
            summary[f"image_{index + 1}_inverted"] = "yes" if inverted else "no"
        lungs_found = not (math.isnan(rotation) or math.isnan(clipped))
        if not lungs_found:
            # Not a frontal chest as the checks know one: say so, and judge nothing more.
            evaluations.append(Evaluation(LUNG, ABSENT, image_index=index))
            summary[f"image_{index + 1}_lung_fields"] = "not found"
            return problems, False
        rotated = abs(rotation) > MAX_ROTATION_INDEX
        clipping = clipped > MAX_CLIPPED_FRACTION
        problems += rotated + clipping
        evaluations.append(Evaluation(POSITIONING, _present(rotated), image_index=index))
        evaluations.append(Evaluation(EXPOSURE_CLIPPING, _present(clipping), image_index=index))
        measurements.append(
            Measurement(None, ROTATION_INDEX, round(abs(rotation), 3), NO_UNITS, index)
        )
        measurements.append(
            Measurement(None, CLIPPED_PERCENT, round(100.0 * clipped, 2), PERCENT, index)
        )
        summary[f"image_{index + 1}_rotation_index"] = round(abs(rotation), 3)
        summary[f"image_{index + 1}_clipped_percent"] = round(100.0 * clipped, 2)
        return problems, inversion_known
