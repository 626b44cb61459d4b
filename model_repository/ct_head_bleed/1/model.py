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

Memory and cores: the steps run a slice at a time where the method is in plane (hole
filling, the median, the opening), on threads (scipy.ndimage releases the GIL; the
model's ``threads`` parameter, 0: every core its process may use). The 3-D distance
to bone is found from each slice's own 2-D distance map and those of the slices
within MARGIN_MM (the nearest bone lies in one of them), not from a 3-D distance
transform of the volume, which took 24 times the volume's memory and 16 s of 30 for
a 160-slice 512 x 512 head.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
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


def _in_turn(work: Callable[[int], None], count: int, threads: int) -> None:
    """Run ``work`` on each slice index below ``count`` on ``threads`` threads (0: as
    many as the cores this process may use); a failure is raised."""
    workers = min(threads or len(os.sched_getaffinity(0)), count)
    if workers <= 1:
        for index in range(count):
            work(index)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="ct-head") as pool:
        list(pool.map(work, range(count)))


def cranial_cavity(hu: Array, spacing: Array, threads: int = 0) -> Array:
    """Voxels enclosed by bone in their slice, at least MARGIN_MM from any bone in 3-D
    (thick slices near the vertex and the skull base mix bone into brain through the
    slice, not only in plane)."""
    bone = hu > BONE_HU
    enclosed = np.zeros(hu.shape, dtype=bool)

    def enclose(index: int) -> None:
        if bone[index].any():
            enclosed[index] = ndimage.binary_fill_holes(bone[index]) & ~bone[index]

    _in_turn(enclose, hu.shape[0], threads)
    if not enclosed.any():
        return enclosed
    return enclosed & _far_from(bone, enclosed, spacing, threads)


def _far_from(bone: Array, where: Array, spacing: Array, threads: int) -> Array:
    """Whether each voxel of ``where`` lies at least MARGIN_MM from every voxel of
    ``bone`` (3-D, in mm): the squared distance is the least, over the slices within
    the margin, of the slice's 2-D squared distance to its bone plus the slices'
    squared distance apart. Only ``where``'s bounding box is mapped."""
    (box,) = ndimage.find_objects(where.astype(np.uint8))
    rows, columns = box[1], box[2]
    squared = np.empty(
        (bone.shape[0], rows.stop - rows.start, columns.stop - columns.start), dtype=np.float32
    )
    in_plane = (float(spacing[1]), float(spacing[2]))

    def map_slice(index: int) -> None:
        if not bone[index].any():
            squared[index] = np.inf
            return
        distance = ndimage.distance_transform_edt(~bone[index], sampling=in_plane)
        squared[index] = distance[rows, columns] ** 2

    _in_turn(map_slice, bone.shape[0], threads)
    margin = MARGIN_MM**2
    reach = [k for k in range(-bone.shape[0], bone.shape[0]) if (k * spacing[0]) ** 2 < margin]
    far = np.zeros(bone.shape, dtype=bool)
    for index in range(box[0].start, box[0].stop):
        near = np.full(squared.shape[1:], np.inf, dtype=np.float32)
        for k in reach:
            if 0 <= index + k < bone.shape[0]:
                np.minimum(near, squared[index + k] + np.float32((k * spacing[0]) ** 2), out=near)
        far[index, rows, columns] = near >= margin
    return far


def _blood(hu: Array, cavity: Array, threads: int) -> Array:
    """Voxels of acute-blood density in the cavity, each slice smoothed (a 3x3 median)
    and opened in plane."""
    blood = np.zeros(hu.shape, dtype=bool)

    def find(index: int) -> None:
        if not cavity[index].any():
            return
        smooth = ndimage.median_filter(hu[index], size=(3, 3))
        dense = (smooth >= BLOOD_MIN_HU) & (smooth <= BLOOD_MAX_HU) & cavity[index]
        blood[index] = ndimage.binary_opening(dense, structure=_IN_PLANE[0])

    _in_turn(find, hu.shape[0], threads)
    return blood


def _sizes(labels: Array, count: int) -> Array:
    """Voxels of regions 1..count, counted a few slices at a time (bincount makes an
    int64 copy of what it is given)."""
    sizes = np.zeros(count + 1, dtype=np.int64)
    step = max(1, (1 << 22) // max(1, labels[0].size))
    for start in range(0, labels.shape[0], step):
        sizes += np.bincount(labels[start : start + step].ravel(), minlength=count + 1)
    return sizes[1:]


def find_candidates(hu: Array, spacing: Array, threads: int = 0) -> Array:
    """Label the candidate hyperdense regions; see the module docstring."""
    labels_out = np.zeros(hu.shape, dtype=np.uint8)
    cavity = cranial_cavity(hu, spacing, threads)
    if not cavity.any():
        return labels_out
    blood = _blood(hu, cavity, threads)
    del cavity
    structure = np.ones((3, 3, 3), dtype=bool)
    try:  # uint16: half of scipy's int32, unless there are more regions than it counts
        labels = np.empty(hu.shape, dtype=np.uint16)
        count = int(ndimage.label(blood, structure=structure, output=labels))
    except RuntimeError:
        labels, count = ndimage.label(blood, structure=structure)
    del blood
    if count == 0:
        return labels_out
    sizes = _sizes(labels, count)
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
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self._threads = int(parameters.get("threads", {}).get("string_value", "0") or 0)

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
                labels = find_candidates(hu, spacing.astype(np.float64), self._threads)
                output = pb.Tensor("CANDIDATE_LABELS", labels)
                responses.append(pb.InferenceResponse(output_tensors=[output]))
            except Exception as exc:  # a request's failure is reported, not raised
                responses.append(
                    pb.InferenceResponse(output_tensors=[], error=pb.TritonError(str(exc)))
                )
        return responses
