"""Quality checks of frontal chest radiographs (Triton Python backend).

Input ``IMAGE`` (float32, image x row x column): each image's values as displayed,
brighter is higher. Outputs, one value per image (float32):

- ``INVERSION_SCORE``: how much brighter the lateral thirds of the chest are than the
  middle third (mean over the rows of the lung fields, on a 1st-99th percentile
  scale). A chest shown the right way has a bright mediastinum and spine between
  dark lungs (below zero); shown as a negative, above zero.
- ``ROTATION_INDEX``: how far the middle between the lungs' inner edges lies from the
  middle between their outer edges, as a fraction of half the width across both
  lungs, in the upper half of the lung fields (above the heart); positive towards
  higher columns. NaN when two lung fields are not found.
- ``CLIPPED_FRACTION``: the fraction of the lung fields' pixels at the image's
  lowest or highest value, where detail was lost to a saturated detector or a
  clipped rescale. NaN when two lung fields are not found.

Lung fields are the two largest dark regions (below an Otsu threshold) that do not
touch the image's edge, which air outside the body does. An image that looks
inverted is turned back before they are looked for. Images are subsampled (every
n-th pixel, so clipped values stay exact) to about ANALYSIS_SIZE pixels across.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

Array = npt.NDArray[Any]

ANALYSIS_SIZE = 256
# A lung field is at least this fraction of the image.
MIN_LUNG_FRACTION = 0.01
# Within this fraction of the value range of the image's lowest or highest value, a
# pixel is clipped.
CLIP_TOLERANCE = 1e-3


def _normalised(image: Array) -> Array | None:
    low, high = np.percentile(image, (1.0, 99.0))
    if high <= low:
        return None
    scaled: Array = np.clip((image - low) / (high - low), 0.0, 1.0)
    return scaled


def inversion_score(scaled: Array) -> float:
    rows, columns = scaled.shape
    profile = scaled[int(0.3 * rows) : int(0.65 * rows)].mean(axis=0)
    middle = profile[columns // 3 : 2 * columns // 3].mean()
    lateral = np.concatenate(
        [
            profile[int(0.12 * columns) : columns // 3],
            profile[2 * columns // 3 : int(0.88 * columns)],
        ]
    ).mean()
    return float(lateral - middle)


def _otsu(values: Array) -> float:
    counts, edges = np.histogram(values, bins=128, range=(0.0, 1.0))
    centres = (edges[:-1] + edges[1:]) / 2.0
    weight_low = np.cumsum(counts)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(counts * centres)
    mean_low = sum_low / np.maximum(weight_low, 1)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between))])


def lung_fields(scaled: Array) -> tuple[Array, Array] | None:
    """The masks of the lung field at lower columns and at higher columns, or None."""
    dark = scaled < _otsu(scaled)
    labels, count = ndimage.label(dark)
    if count < 2:
        return None
    edge = set(np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    inner = [
        i
        for i in range(1, count + 1)
        if i not in edge and sizes[i] >= MIN_LUNG_FRACTION * scaled.size
    ]
    if len(inner) < 2:
        return None
    two = sorted(inner, key=lambda i: -sizes[i])[:2]
    masks = [labels == i for i in two]
    masks.sort(key=lambda m: float(np.nonzero(m)[1].mean()))
    return masks[0], masks[1]


def rotation_index(low: Array, high: Array) -> float:
    rows = np.nonzero(low.any(axis=1) & high.any(axis=1))[0]
    if len(rows) == 0:
        return float("nan")
    upper = rows[: max(1, len(rows) // 2)]
    offsets = []
    for row in upper:
        low_columns, high_columns = np.nonzero(low[row])[0], np.nonzero(high[row])[0]
        outer_low, inner_low = low_columns.min(), low_columns.max()
        inner_high, outer_high = high_columns.min(), high_columns.max()
        half = (outer_high - outer_low) / 2.0
        if half <= 0:
            continue
        offsets.append(((inner_low + inner_high) / 2.0 - (outer_low + outer_high) / 2.0) / half)
    return float(np.median(offsets)) if offsets else float("nan")


def check_image(image: Array) -> tuple[float, float, float]:
    """(inversion score, rotation index, clipped fraction) of one image."""
    step = max(1, int(np.ceil(max(image.shape) / ANALYSIS_SIZE)))
    small = image[::step, ::step].astype(np.float64)
    scaled = _normalised(small)
    if scaled is None:
        return float("nan"), float("nan"), float("nan")
    score = inversion_score(scaled)
    fields = lung_fields(1.0 - scaled if score > 0 else scaled)
    if fields is None:
        return score, float("nan"), float("nan")
    low, high = fields
    lowest, highest = float(small.min()), float(small.max())
    tolerance = CLIP_TOLERANCE * (highest - lowest)
    clipped = (small <= lowest + tolerance) | (small >= highest - tolerance)
    lungs = low | high
    return score, rotation_index(low, high), float(clipped[lungs].mean())


def check_images(images: Array) -> dict[str, Array]:
    results = np.array([check_image(image) for image in images], dtype=np.float32).reshape(-1, 3)
    return {
        "INVERSION_SCORE": results[:, 0].copy(),
        "ROTATION_INDEX": results[:, 1].copy(),
        "CLIPPED_FRACTION": results[:, 2].copy(),
    }


class TritonPythonModel:
    """Triton's entry point; the checks above are plain numpy/scipy."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils

    def execute(self, requests: list[object]) -> list[object]:
        pb = self._pb
        responses = []
        for request in requests:
            try:
                images = pb.get_input_tensor_by_name(request, "IMAGE").as_numpy()
                if images.ndim != 3:
                    raise ValueError(f"IMAGE must be image x row x column, got {images.shape}")
                outputs = [pb.Tensor(name, value) for name, value in check_images(images).items()]
                responses.append(pb.InferenceResponse(output_tensors=outputs))
            except Exception as exc:  # a request's failure is reported, not raised
                responses.append(
                    pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
                )
        return responses
