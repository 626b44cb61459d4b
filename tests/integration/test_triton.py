"""The Triton adapter and the startup check, against the real embedded tritonserver."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import yaml
from structlog.testing import capture_logs

from infergate.config import TritonSettings
from infergate.errors import InferenceError, InferenceTimeoutError, ModelMismatchError
from infergate.inference import shared_memory
from infergate.inference.embedded import EmbeddedTriton
from infergate.inference.shared_memory import shared_memory_inputs
from infergate.inference.triton import TritonClient
from infergate.inference.volume import load_series
from infergate.plugin_api import TensorSpec
from infergate.testing import ChestPhantom
from infergate.testing.radiograph_phantom import chest_radiograph_image
from infergate_plugins.ct_lung import plugin
from peers import REPO, run_cli, triton_settings

pytestmark = pytest.mark.integration


def _triton_settings(repository: Path) -> TritonSettings:
    return triton_settings(repository, request_timeout_s=60)


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonClient]:
    settings = _triton_settings(REPO / "model_repository")
    server = EmbeddedTriton(settings, tmp_path_factory.mktemp("triton"))
    server.start()
    # As `infergate serve` has it with the embedded Triton: inputs through shared memory.
    client = TritonClient(settings.grpc_url, settings.request_timeout_s, shared_memory=True)
    yield client
    client.close()
    server.stop()


def test_plugin_matches_its_model(triton: TritonClient) -> None:
    meta = triton.check_plugin(plugin.spec)
    assert meta.name == "ct_lung_seg"
    assert [t.name for t in meta.inputs] == ["CT_HU", "SPACING_MM"]


def test_mismatched_inputs_are_named(triton: TritonClient) -> None:
    wrong = replace(
        plugin.spec,
        inputs=(TensorSpec("CT_HU", "FP32", (-1, -1, -1)), TensorSpec("SPACING", "FP32", (3,))),
    )
    with pytest.raises(ModelMismatchError) as caught:
        triton.check_plugin(wrong)
    message = str(caught.value)
    assert "input 'CT_HU' is INT16 in Triton, FP32 in the plugin" in message
    assert "input 'SPACING' is not served" in message


def test_missing_model_is_named(triton: TritonClient) -> None:
    with pytest.raises(ModelMismatchError, match="no ready model 'absent_model'"):
        triton.check_plugin(replace(plugin.spec, model_name="absent_model"))


def test_inference_through_triton_matches_the_phantom(
    triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    loaded = load_series(list(small_phantom.paths))
    answer = triton.infer("ct_lung_seg", plugin.preprocess(loaded.series), ("LUNG_LABELS",))
    assert answer.model_version == "1"  # the version Triton ran, as the results record it
    outputs = answer.outputs
    labels = outputs["LUNG_LABELS"]
    assert labels.shape == loaded.series.volume.shape
    assert labels.dtype == np.uint8
    findings = plugin.postprocess(loaded.series, outputs)
    volumes = {m.segment_number: m.value for m in findings.measurements}
    assert volumes[1] == pytest.approx(small_phantom.right_lung_ml, rel=0.03)


def test_model_errors_and_timeouts_become_inference_errors(triton: TritonClient) -> None:
    with pytest.raises(InferenceError, match="unexpected shape for input 'CT_HU'"):
        triton.infer(
            "ct_lung_seg",
            {"CT_HU": np.zeros((4, 4), np.int16), "SPACING_MM": np.ones(3, np.float32)},
            ("LUNG_LABELS",),
        )
    impatient = TritonClient(triton.url, timeout_s=0.001)
    try:
        with pytest.raises(InferenceTimeoutError, match=r"within its deadline of 0\.001 s"):
            impatient.infer(
                "ct_lung_seg",
                {"CT_HU": np.zeros((60, 256, 256), np.int16), "SPACING_MM": np.ones(3, np.float32)},
                ("LUNG_LABELS",),
            )
    finally:
        impatient.close()


def _our_regions() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"infergate_{os.getpid()}_*")}


def test_shared_memory_and_grpc_give_the_same_answer_and_leave_nothing(
    triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    inputs = plugin.preprocess(load_series(list(small_phantom.paths)).series)
    before = _our_regions()
    shared = triton.infer("ct_lung_seg", inputs, ("LUNG_LABELS",)).outputs
    assert triton.shared_memory  # it did not fall back
    plain = TritonClient(triton.url, timeout_s=60)
    try:
        grpc = plain.infer("ct_lung_seg", inputs, ("LUNG_LABELS",)).outputs
        # Nothing stays registered with Triton, or in /dev/shm, after a request.
        assert plain._client.get_system_shared_memory_status(as_json=True) == {}
    finally:
        plain.close()
    np.testing.assert_array_equal(shared["LUNG_LABELS"], grpc["LUNG_LABELS"])
    assert _our_regions() == before


def test_a_volume_built_in_job_memory_is_read_by_triton_where_it_lies(
    triton: TritonClient, small_phantom: ChestPhantom
) -> None:
    """The volume is made in the job's shared memory: the request names that region,
    not a copy; the label map comes back in a region of the job's too; the answer is
    the one over gRPC; nothing is left after the job."""
    before = _our_regions()
    memory = triton.job_memory()
    try:
        loaded = load_series(
            list(small_phantom.paths), volume_type=plugin.spec.volume_type, allocate=memory.empty
        )
        inputs = plugin.preprocess(loaded.series)
        found = memory.find(inputs["CT_HU"])
        assert found is not None
        with shared_memory_inputs(triton._client, inputs, 60, memory) as request:
            regions = {t.name: t.region for t in request}
        assert regions["CT_HU"] == found[0].name
        assert regions["SPACING_MM"] != found[0].name  # a few numbers, copied
        known = {"LUNG_LABELS": (inputs["CT_HU"].shape, np.dtype(np.uint8))}
        shared = triton.infer(
            "ct_lung_seg", inputs, ("LUNG_LABELS",), memory=memory, known_outputs=known
        ).outputs
        # The label map was written by Triton into the job's memory, not sent back.
        assert memory.find(shared["LUNG_LABELS"]) is not None
        plain = TritonClient(triton.url, timeout_s=60)
        try:
            grpc = plain.infer("ct_lung_seg", inputs, ("LUNG_LABELS",)).outputs
        finally:
            plain.close()
        np.testing.assert_array_equal(shared["LUNG_LABELS"], grpc["LUNG_LABELS"])
    finally:
        memory.close()
    assert _our_regions() == before


def test_a_region_that_cannot_be_made_falls_back_to_grpc(
    triton: TritonClient, small_phantom: ChestPhantom, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/dev/shm full (a container's 64 MB default): found when the region's room is
    reserved, before anything is written; the volume is made in the job's own memory,
    the request goes over gRPC, and so do the next ones."""
    before = _our_regions()
    client = TritonClient(triton.url, timeout_s=60, shared_memory=True)

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(shared_memory.os, "posix_fallocate", full)  # type: ignore[attr-defined]
    memory = client.job_memory()
    try:
        with capture_logs() as logs:
            loaded = load_series(
                list(small_phantom.paths), volume_type="int16", allocate=memory.empty
            )
            inputs = plugin.preprocess(loaded.series)
            answer = client.infer("ct_lung_seg", inputs, ("LUNG_LABELS",), memory=memory)
            client.infer("ct_lung_seg", inputs, ("LUNG_LABELS",))
    finally:
        memory.close()
        client.close()
    assert answer.outputs["LUNG_LABELS"].shape == inputs["CT_HU"].shape
    assert memory.find(inputs["CT_HU"]) is None  # in the job's own memory
    assert not client.shared_memory
    fallbacks = [e for e in logs if e["event"] == "inference.shared_memory.unavailable"]
    assert len(fallbacks) == 2  # the volume's region, then the request's
    assert all("No space left on device" in e["reason"] for e in fallbacks)
    assert _our_regions() == before


def _requests_served(client: TritonClient, model: str, at_least: int = 0) -> int:
    """The requests ``model`` answered. Triton counts one a moment after its answer
    (seen under load in CI): waits, 5 s at most, until ``at_least`` are counted."""
    deadline = time.monotonic() + 5.0
    while True:
        stats = client._client.get_inference_statistics(model, as_json=True)["model_stats"][0]
        count = int(stats["inference_stats"]["success"].get("count", 0))
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


def test_chunks_in_flight_give_the_answer_of_one_request(triton: TritonClient) -> None:
    """cxr_quality takes images alone: over gRPC, five images go as five requests, two
    in flight, and the answer is that of one request; through shared memory, one."""
    rotations = (0.0, 0.2, -0.15, 0.1, 0.3)
    images = np.stack(
        [chest_radiograph_image(rotation=r, seed=i)[0] for i, r in enumerate(rotations)]
    ).astype(np.float32)
    names = ("INVERSION_SCORE", "ROTATION_INDEX", "CLIPPED_FRACTION")
    plain = TritonClient(triton.url, timeout_s=60, max_in_flight=2)
    try:
        start = _requests_served(plain, "cxr_quality")
        whole = plain.infer("cxr_quality", {"IMAGE": images}, names).outputs
        before = _requests_served(plain, "cxr_quality", start + 1)
        answer = plain.infer("cxr_quality", {"IMAGE": images}, names, slice_chunk=1)
        assert answer.model_version == "1"
        chunked = answer.outputs
        assert _requests_served(plain, "cxr_quality", before + 5) == before + 5
        triton.infer("cxr_quality", {"IMAGE": images}, names, slice_chunk=1)
        assert _requests_served(plain, "cxr_quality", before + 6) == before + 6
        with pytest.raises(InferenceError, match="Triton model 'absent_model' failed"):
            plain.infer("absent_model", {"IMAGE": images}, names, slice_chunk=2)
    finally:
        plain.close()
    for name in names:
        np.testing.assert_array_equal(chunked[name], whole[name])
    assert np.abs(chunked["ROTATION_INDEX"]) == pytest.approx(np.abs(rotations), abs=0.02)


def _check(tmp_path: Path, repository: Path) -> subprocess.CompletedProcess[str]:
    settings = _triton_settings(repository)
    config = {
        # Relative, like the default: resolved against the working directory.
        "storage": {"var_dir": "var"},
        "triton": {
            "model_repository": str(repository),
            "grpc_port": settings.grpc_port,
            "http_port": settings.http_port,
            "metrics_port": settings.metrics_port,
        },
    }
    path = tmp_path / "ig.yaml"
    path.write_text(yaml.safe_dump(config))
    return run_cli("check", "--config", str(path), cwd=tmp_path, timeout=180)


def test_check_passes_on_the_shipped_repository(tmp_path: Path) -> None:
    result = _check(tmp_path, REPO / "model_repository")
    assert result.returncode == 0, result.stderr
    assert '"event": "check.ok"' in result.stdout


def test_check_fails_when_the_model_is_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty-repo"
    empty.mkdir()
    result = _check(tmp_path, empty)
    assert result.returncode == 1
    # Every plugin's missing model is named, not only the first.
    for model in ("ct_head_bleed", "ct_lung_seg", "cxr_quality"):
        assert f"no ready model '{model}'" in result.stderr
    assert "not in its model repository" in result.stderr


def test_check_fails_when_the_model_inputs_differ(tmp_path: Path) -> None:
    repository = tmp_path / "repo"
    shutil.copytree(REPO / "model_repository", repository)
    config = repository / "ct_lung_seg" / "config.pbtxt"
    config.write_text(config.read_text().replace("TYPE_INT16", "TYPE_FP32"))
    result = _check(tmp_path, repository)
    assert result.returncode == 1
    assert "input 'CT_HU' is FP32 in Triton, INT16 in the plugin" in result.stderr
