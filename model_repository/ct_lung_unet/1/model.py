"""Lung segmentation on CT by a trained 2-D U-Net: the ONNX network of this folder
(``model.onnx``, made by ``../train/train.py``) run by onnxruntime in Triton's
Python backend, the embedded CPU default. On a GPU host the same file is served by
Triton's own ``onnxruntime_onnx`` platform instead (``deploy/triton/gpu/``), and this
module is not used: it adds nothing to the network, so both answer the same.

Input ``CT_HU`` (int16, slices x rows x columns, rows and columns multiples of 16),
output ``LUNG_LABELS`` (uint8, the same shape): 0 background, 1 the lung at smaller
column indices, 2 the other, as ``ct_lung_seg``. Slices are independent (the
model's batch dimension): with dynamic batching, the requests Triton hands over at
once (slices of several jobs) run as one batch when their rows and columns agree.

The ``threads`` parameter (config.pbtxt) is onnxruntime's intra-op thread count;
"0": one per core this process may use.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

Array = npt.NDArray[Any]


def session(path: Path, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session of the network at ``path`` on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def labels_of(run: ort.InferenceSession, hu: Array) -> Array:
    """The network's labels of the int16 slices ``hu`` (N, rows, columns)."""
    if hu.ndim != 3 or hu.dtype != np.int16:
        raise ValueError(f"CT_HU must be int16 slices x rows x columns, got {hu.dtype} {hu.shape}")
    if hu.shape[1] % 16 or hu.shape[2] % 16:
        raise ValueError(f"rows and columns must be multiples of 16, got {hu.shape[1:]}")
    (labels,) = run.run(["LUNG_LABELS"], {"CT_HU": hu})
    return np.asarray(labels)


class TritonPythonModel:
    """Triton's entry point."""

    def initialize(self, args: dict[str, str]) -> None:
        import triton_python_backend_utils as pb_utils

        self._pb = pb_utils
        parameters = json.loads(args["model_config"]).get("parameters", {})
        threads = int(parameters.get("threads", {}).get("string_value", "0") or 0)
        folder = Path(args["model_repository"]) / args["model_version"]
        self._session = session(folder / "model.onnx", threads)

    def execute(self, requests: list[object]) -> list[object]:
        pb = self._pb
        inputs = [pb.get_input_tensor_by_name(r, "CT_HU").as_numpy() for r in requests]
        results: list[Array | Exception] = [ValueError("not run")] * len(requests)
        # Requests whose slices have the same rows and columns run as one batch.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, hu in enumerate(inputs):
            groups.setdefault(tuple(hu.shape[1:]), []).append(index)
        for members in groups.values():
            try:
                labels = labels_of(self._session, np.concatenate([inputs[i] for i in members]))
            except Exception as exc:  # a request's failure is reported, not raised
                for i in members:
                    results[i] = exc
                continue
            ends = np.cumsum([len(inputs[i]) for i in members])
            for i, part in zip(members, np.split(labels, ends[:-1]), strict=True):
                results[i] = part
        responses = []
        for result in results:
            if isinstance(result, Exception):
                error = pb.TritonError(str(result))
                responses.append(pb.InferenceResponse(output_tensors=[], error=error))
            else:
                tensor = pb.Tensor("LUNG_LABELS", np.ascontiguousarray(result))
                responses.append(pb.InferenceResponse(output_tensors=[tensor]))
        return responses
