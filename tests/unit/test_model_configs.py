"""The trained network's two Triton configurations (the embedded CPU default and a
GPU host's) and its ONNX file agree, checked without a GPU or a running Triton."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from peers import REPO

MODEL = REPO / "model_repository" / "ct_lung_unet"
GPU = REPO / "deploy" / "triton" / "gpu" / "ct_lung_unet"
# Triton's data types as onnxruntime names them.
ONNX_TYPES = {mc.TYPE_INT16: "tensor(int16)", mc.TYPE_UINT8: "tensor(uint8)"}


def _config(path: Path) -> mc.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), mc.ModelConfig())


def _tensors(config: mc.ModelConfig) -> list[tuple[str, str, int, tuple[int, ...]]]:
    return [
        (kind, t.name, t.data_type, tuple(t.dims))
        for kind, tensors in (("input", config.input), ("output", config.output))
        for t in tensors
    ]


def test_the_cpu_and_gpu_configurations_serve_the_same_model() -> None:
    cpu, gpu = _config(MODEL / "config.pbtxt"), _config(GPU / "config.pbtxt")
    assert cpu.name == gpu.name == MODEL.name
    assert _tensors(cpu) == _tensors(gpu)
    assert cpu.max_batch_size == gpu.max_batch_size > 0
    assert cpu.dynamic_batching == gpu.dynamic_batching
    assert max(cpu.dynamic_batching.preferred_batch_size) <= cpu.max_batch_size
    # The embedded default runs the ONNX file in the Python backend on the CPU; a GPU
    # host runs it with Triton's ONNX Runtime backend on its GPUs.
    assert (cpu.backend, cpu.platform) == ("python", "")
    assert {g.kind for g in cpu.instance_group} == {mc.ModelInstanceGroup.KIND_CPU}
    assert gpu.platform == "onnxruntime_onnx"
    assert {g.kind for g in gpu.instance_group} == {mc.ModelInstanceGroup.KIND_GPU}


def test_the_onnx_file_has_the_configured_inputs_and_outputs() -> None:
    config = _config(MODEL / "config.pbtxt")
    path = MODEL / "1" / "model.onnx"
    assert path.stat().st_size < 20 * 1024 * 1024  # committed, never downloaded
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for configured, served in (
        (config.input, session.get_inputs()),
        (config.output, session.get_outputs()),
    ):
        assert [t.name for t in configured] == [t.name for t in served]
        for tensor, onnx_tensor in zip(configured, served, strict=True):
            assert ONNX_TYPES[tensor.data_type] == onnx_tensor.type
            # The batch dimension first (max_batch_size > 0), then the configured ones.
            assert len(onnx_tensor.shape) == 1 + len(tensor.dims)


def test_the_gpu_image_serves_the_gpu_configuration() -> None:
    dockerfile = (REPO / "deploy" / "triton" / "Dockerfile").read_text(encoding="utf-8")
    copies = [line.split()[1:] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    # The GPU configurations over the repository's, in that order.
    assert copies == [["model_repository/", "/models/"], ["deploy/triton/gpu/", "/models/"]]
