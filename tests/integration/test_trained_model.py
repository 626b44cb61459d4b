"""The trained network (model_repository/ct_lung_unet) as the embedded Triton serves
it: the same answer as onnxruntime called directly, and requests batched together."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from infergate.errors import ModelMismatchError
from infergate.inference.embedded import EmbeddedTriton
from infergate.inference.triton import TritonClient
from infergate.inference.volume import load_series
from infergate.testing import ChestPhantom
from infergate_plugins.ct_lung.plugin import MIN_LUNG_ML
from infergate_plugins.ct_lung_unet import plugin as unet_plugin
from peers import REPO, triton_settings

pytestmark = pytest.mark.integration

MODEL = "ct_lung_unet"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonClient]:
    settings = triton_settings(REPO / "model_repository", request_timeout_s=120)
    server = EmbeddedTriton(settings, tmp_path_factory.mktemp("triton"), models=(MODEL,))
    server.start()
    client = TritonClient(settings.grpc_url, settings.request_timeout_s)
    yield client
    client.close()
    server.stop()


def _volume(phantom: ChestPhantom) -> npt.NDArray[np.int16]:
    return np.ascontiguousarray(load_series(list(phantom.paths), volume_type="int16").series.volume)


def _stats(client: TritonClient) -> dict[str, Any]:
    stats: dict[str, Any] = client._client.get_inference_statistics(MODEL, as_json=True)
    return stats["model_stats"][0]  # type: ignore[no-any-return]


def _count(stats: dict[str, Any], what: str = "inference_count") -> int:
    """A count of Triton's statistics: left out of its JSON while it is 0."""
    return int(stats.get(what, 0))


def test_triton_answers_as_onnxruntime_does(
    served: TritonClient, unet_model: ModuleType, small_phantom: ChestPhantom
) -> None:
    hu = _volume(small_phantom)
    answer = served.infer(MODEL, {"CT_HU": hu}, ("LUNG_LABELS",), slice_chunk=8)
    direct = unet_model.labels_of(
        unet_model.session(REPO / "model_repository" / MODEL / "1" / "model.onnx"), hu
    )
    labels = answer.outputs["LUNG_LABELS"]
    assert labels.shape == hu.shape
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, direct)
    # It found two lungs, the first at smaller columns, as ct_lung_seg labels them.
    assert set(np.unique(labels)) == {0, 1, 2}
    columns = [np.nonzero(labels == k)[2].mean() for k in (1, 2)]
    assert columns[0] < columns[1]


def test_requests_of_several_jobs_are_batched_together(
    served: TritonClient, small_phantom: ChestPhantom
) -> None:
    """Four jobs' requests at once, of 4 slices each: Triton's dynamic batcher runs
    fewer batches than it got requests (the statistics count both)."""
    hu = _volume(small_phantom)[:4]
    before = _stats(served)
    answers: list[npt.NDArray[np.generic]] = []
    start = threading.Barrier(4)

    def job() -> None:
        client = TritonClient(served.url, 120)
        try:
            start.wait()
            answers.append(
                client.infer(MODEL, {"CT_HU": hu}, ("LUNG_LABELS",)).outputs["LUNG_LABELS"]
            )
        finally:
            client.close()

    for _ in range(3):  # a round or two may find the batcher idle; three seldom do
        threads = [threading.Thread(target=job) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        start.reset()
    deadline = time.monotonic() + 5
    while True:
        after = _stats(served)
        requests = _count(after) - _count(before)
        if requests >= 48 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    executions = _count(after, "execution_count") - _count(before, "execution_count")
    assert len(answers) == 12
    for answer in answers:
        np.testing.assert_array_equal(answer, answers[0])
    assert requests == 48  # inference_count counts slices (batch items)
    assert executions < 12


def test_a_real_head_ct_has_no_lung_the_plugin_would_keep(
    served: TritonClient, head_ct: list[Path]
) -> None:
    """A scan no one here made, with no lungs: what the network calls lung in it is
    less than ct_lung's smallest lung (its postprocess, shared by this model's plugin,
    keeps no candidate under MIN_LUNG_ML)."""
    loaded = load_series(head_ct, volume_type="int16")
    hu = np.ascontiguousarray(loaded.series.volume)
    labels = served.infer(MODEL, {"CT_HU": hu}, ("LUNG_LABELS",), slice_chunk=16).outputs[
        "LUNG_LABELS"
    ]
    for label in (1, 2):
        volume_ml = float(np.count_nonzero(labels == label)) * loaded.series.voxel_volume_ml
        assert volume_ml < MIN_LUNG_ML


def test_chunks_through_shared_memory_name_parts_of_the_job_regions(
    served: TritonClient, chest_phantom: ChestPhantom
) -> None:
    """A volume of more slices than the model's batch may hold (100 > 64) goes through
    the job's shared memory as chunks of its slices: each request names its part of
    the volume's region and of the label map's, which Triton writes in place; the
    answer is that of the chunks over gRPC."""
    shared = TritonClient(served.url, 120, shared_memory=True)
    memory = shared.job_memory()
    try:
        loaded = load_series(list(chest_phantom.paths), volume_type="int16", allocate=memory.empty)
        hu = loaded.series.volume
        assert memory.find(hu) is not None
        known = {"LUNG_LABELS": (hu.shape, np.dtype(np.uint8))}
        before = _stats(served)
        answer = shared.infer(
            MODEL,
            {"CT_HU": hu},
            ("LUNG_LABELS",),
            slice_chunk=32,
            memory=memory,
            known_outputs=known,
        )
        labels = answer.outputs["LUNG_LABELS"]
        assert memory.find(labels) is not None  # written by Triton into the job's region
        assert answer.model_version == "1"
        deadline = time.monotonic() + 5
        while _count(_stats(served)) - _count(before) < 100:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        over_grpc = served.infer(MODEL, {"CT_HU": np.asarray(hu)}, ("LUNG_LABELS",), slice_chunk=32)
        np.testing.assert_array_equal(labels, over_grpc.outputs["LUNG_LABELS"])
    finally:
        memory.close()
        shared.close()


def test_the_plugin_passes_the_check_against_the_live_model(served: TritonClient) -> None:
    """What ``infergate check`` does for it: names, types, shapes, the version it
    pins, and chunks no larger than the batch the model takes."""
    meta = served.check_plugin(unet_plugin.spec)
    assert meta.max_batch_size == 64
    assert meta.versions == ("1",)
    whole = replace(unet_plugin.spec, slice_chunk=None)
    with pytest.raises(ModelMismatchError, match=r"at most 64 slices .* whole volumes"):
        served.check_plugin(whole)
    with pytest.raises(ModelMismatchError, match="the plugin sends chunks of 100 slices"):
        served.check_plugin(replace(unet_plugin.spec, slice_chunk=100))
    with pytest.raises(ModelMismatchError, match="no ready model 'ct_lung_unet'"):
        served.check_plugin(replace(unet_plugin.spec, model_version="2"))
