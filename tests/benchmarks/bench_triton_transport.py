"""How inputs reach Triton: shared memory, one gRPC request, or chunks in flight (run on
demand, not in the suite).

The embedded tritonserver with the shipped model repository; each way is timed as
the whole `TritonClient.infer` call (inputs in, model, outputs back), medians over
``--repeats``. cxr_quality takes images alone, so its series can also go as chunks of
images with several requests in flight; ct_lung_seg is a 3-D model and cannot.

    .venv/bin/python tests/benchmarks/bench_triton_transport.py --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.config import TritonSettings
from infergate.inference.embedded import EmbeddedTriton
from infergate.inference.triton import TritonClient
from infergate.inference.volume import load_series
from infergate.testing import write_chest_ct
from infergate.testing.radiograph_phantom import chest_radiograph_image
from infergate_plugins.ct_lung import plugin as ct_lung
from peers import REPO, free_port

CXR_OUTPUTS = ("INVERSION_SCORE", "ROTATION_INDEX", "CLIPPED_FRACTION")


def _time(call: Callable[[], None], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = TritonSettings(
            model_repository=REPO / "model_repository",
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
        )
        server = EmbeddedTriton(settings, root / "triton")
        server.start()
        shared = TritonClient(settings.grpc_url, 300, shared_memory=True)
        try:
            images = np.stack(
                [
                    chest_radiograph_image(2048, 2048, rotation=0.02 * i, seed=i)[0]
                    for i in range(args.images)
                ]
            ).astype(np.float32)
            chest = load_series(list(write_chest_ct(root / "ct").paths)).series
            lung_inputs = ct_lung.preprocess(chest)
            cases: list[
                tuple[
                    str,
                    TritonClient,
                    str,
                    dict[str, npt.NDArray[np.generic]],
                    tuple[str, ...],
                    int | None,
                ]
            ] = []
            cases.append(
                (
                    "cxr_quality, shared memory, 1 request",
                    shared,
                    "cxr_quality",
                    {"IMAGE": images},
                    CXR_OUTPUTS,
                    None,
                )
            )
            for in_flight, chunk in ((1, None), (8, 1), (4, 2)):
                client = TritonClient(settings.grpc_url, 300, max_in_flight=in_flight)
                what = "1 request" if chunk is None else f"chunks of {chunk}, {in_flight} in flight"
                cases.append(
                    (
                        f"cxr_quality, gRPC, {what}",
                        client,
                        "cxr_quality",
                        {"IMAGE": images},
                        CXR_OUTPUTS,
                        chunk,
                    )
                )
            plain = TritonClient(settings.grpc_url, 300)
            cases.append(
                (
                    "ct_lung_seg, shared memory, 1 request",
                    shared,
                    "ct_lung_seg",
                    lung_inputs,
                    ("LUNG_LABELS",),
                    None,
                )
            )
            cases.append(
                (
                    "ct_lung_seg, gRPC, 1 request",
                    plain,
                    "ct_lung_seg",
                    lung_inputs,
                    ("LUNG_LABELS",),
                    None,
                )
            )
            megabytes = {
                "cxr_quality": images.nbytes / 2**20,
                "ct_lung_seg": sum(a.nbytes for a in lung_inputs.values()) / 2**20,
            }
            print(f"{args.repeats} repeats; whole infer call, seconds (median, range)")
            for label, client, model, inputs, outputs, chunk in cases:

                def call(
                    client: TritonClient = client,
                    model: str = model,
                    inputs: dict[str, npt.NDArray[np.generic]] = inputs,
                    outputs: tuple[str, ...] = outputs,
                    chunk: int | None = chunk,
                ) -> None:
                    client.infer(model, inputs, outputs, slice_chunk=chunk)

                call()  # warm
                times = _time(call, args.repeats)
                print(
                    f"  {label:48s} ({megabytes[model]:.0f} MiB in)"
                    f"  {statistics.median(times):6.3f}  {min(times):.3f}-{max(times):.3f}"
                )
        finally:
            shared.close()
            server.stop()


if __name__ == "__main__":
    main()
