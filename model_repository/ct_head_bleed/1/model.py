"""Candidate intracranial hyperdensities on head CT, by density (Triton Python backend).

Input ``CT_HU`` (int16, slice x row x column, Hounsfield units, slices ordered along
the normal) and ``SPACING_MM`` (slice, row, column spacing). Output
``CANDIDATE_LABELS`` (uint8): 0 background, 1..MAX_CANDIDATES the candidate regions,
1 the largest.

The steps: bone is denser than BONE_HU; the cranial cavity is, slice by slice, what
the bone encloses (slices where the skull is not a closed ring contribute nothing);
it is shrunk by MARGIN_MM from the bone, where partial volume of bone and brain
looks like blood. The image is smoothed in plane (a 3x3 median) against noise; voxels
of acute-blood density (BLOOD_MIN_HU..BLOOD_MAX_HU; calcification is denser) inside
the shrunk cavity are candidates; 3-D connected regions of at least MIN_CANDIDATE_ML
are kept, largest first.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
from scipy import ndimage

Array = npt.NDArray[Any]

BONE_HU = 300.0
BLOOD_MIN_HU = 55.0
BLOOD_MAX_HU = 90.0
MARGIN_MM = 5.0
MIN_CANDIDATE_ML = 0.1
MAX_CANDIDATES = 8
_IN_PLANE = np.zeros((1, 3, 3), dtype=bool)
_IN_PLANE[0] = True


def cranial_cavity(hu: Array, spacing: Array) -> Array:
    """Voxels enclosed by bone in their slice, at least MARGIN_MM from any bone in 3-D
    (thick slices near the vertex and the skull base mix bone into brain through the
    slice, not only in plane)."""
    bone = hu > BONE_HU
    enclosed = np.zeros(hu.shape, dtype=bool)
    for index in range(hu.shape[0]):
        if bone[index].any():
            enclosed[index] = ndimage.binary_fill_holes(bone[index]) & ~bone[index]
    if not enclosed.any():
        return enclosed
    sampling = tuple(float(v) for v in spacing)
    distance: Array = ndimage.distance_transform_edt(~bone, sampling=sampling)
    return enclosed & (distance >= MARGIN_MM)


def find_candidates(hu: Array, spacing: Array) -> Array:
    """Label the candidate hyperdense regions; see the module docstring."""
    labels_out = np.zeros(hu.shape, dtype=np.uint8)
    cavity = cranial_cavity(hu, spacing)
    if not cavity.any():
        return labels_out
    smooth = ndimage.median_filter(hu, size=(1, 3, 3))
    blood = (smooth >= BLOOD_MIN_HU) & (smooth <= BLOOD_MAX_HU) & cavity
    # Blood collects in blobs and crescents; thin ribbons of cortex and vessel walls
    # do not survive an in-plane opening.
    blood = ndimage.binary_opening(blood, structure=_IN_PLANE)
    labels, count = ndimage.label(blood, structure=np.ones((3, 3, 3), dtype=bool))
    if count == 0:
        return labels_out
    sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    order = [int(i) for i in np.argsort(sizes)[::-1] if sizes[i] * voxel_ml >= MIN_CANDIDATE_ML]
    for number, index in enumerate(order[:MAX_CANDIDATES], start=1):
        labels_out[labels == index + 1] = number
    return labels_out


class TritonPythonModel:
    """Triton's entry point; the algorithm above is plain numpy/scipy."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils

    def execute(self, requests: list[object]) -> list[object]:
        pb = self._pb
        responses = []
        for request in requests:
            try:
                hu = pb.get_input_tensor_by_name(request, "CT_HU").as_numpy()
                spacing = pb.get_input_tensor_by_name(request, "SPACING_MM").as_numpy()
                if hu.ndim != 3 or spacing.shape != (3,):
                    raise ValueError(
                        f"CT_HU must be 3-D and SPACING_MM have 3 values, got {hu.shape} and"
                        f" {spacing.shape}"
                    )
                labels = find_candidates(hu, spacing.astype(np.float64))
                output = pb.Tensor("CANDIDATE_LABELS", labels)
                responses.append(pb.InferenceResponse(output_tensors=[output]))
            except Exception as exc:  # a request's failure is reported, not raised
                responses.append(
                    pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
                )
        return responses
