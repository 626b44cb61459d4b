"""The trained network ``ct_lung_unet`` in the embedded Triton: per slice and per
study, with and without dynamic batching, one job and several at once, beside the
heuristic model ``ct_lung_seg`` on the same volume (run on demand, not in the suite).

One tritonserver serves, from a copy of the model repository: ``ct_lung_seg``;
``ct_lung_unet`` as shipped (dynamic batching); and ``ct_lung_unet_plain``, the same
ONNX file and model.py with the ``dynamic_batching`` block taken out. The volume is the
chest phantom of ``--slices`` slices of 512 x 512 (int16 HU, as the CT plugins build
it). Each case is timed as whole ``TritonClient.infer`` calls over gRPC, the U-Net's
volume in chunks of ``--chunk`` slices with up to 8 requests in flight (as a plugin's
``slice_chunk`` sends it); ``--jobs`` jobs at once are that many threads, each with its
own client and volume. Triton's statistics give the model's compute time and the
batches it ran (``execution_count``) for the requests it got. Medians over
``--repeats``; onnxruntime in this process (the same file, no Triton) for reference.

    .venv/bin/python tests/benchmarks/bench_trained_model.py --repeats 3
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.config import TritonSettings
from infergate.inference.embedded import EmbeddedTriton
from infergate.inference.triton import TritonClient
from infergate.inference.volume import load_series
from infergate.testing import write_chest_ct
from peers import REPO, free_port

UNET, PLAIN, HEURISTIC = "ct_lung_unet", "ct_lung_unet_plain", "ct_lung_seg"


def _repository(root: Path) -> Path:
    """The three models, the plain one without its dynamic batching."""
    repository = root / "models"
    for name in (UNET, HEURISTIC):
        shutil.copytree(REPO / "model_repository" / name, repository / name)
    shutil.copytree(REPO / "model_repository" / UNET, repository / PLAIN)
    config = (repository / PLAIN / "config.pbtxt").read_text(encoding="utf-8")
    start = config.index("dynamic_batching {")
    config = config[:start] + config[config.index("}", start) + 1 :]
    config = config.replace(f'name: "{UNET}"', f'name: "{PLAIN}"')
    (repository / PLAIN / "config.pbtxt").write_text(config, encoding="utf-8")
    return repository


def _stats(client: TritonClient, model: str) -> tuple[int, int, float]:
    """Requests' items (slices), executions, and compute seconds so far. The compute
    is the batches' (``batch_stats``): a request's own figure counts its batch's
    whole time again for each request in it."""
    stats: dict[str, Any] = client._client.get_inference_statistics(model, as_json=True)
    model_stats = stats["model_stats"][0]
    compute = (
        sum(
            float(batch["compute_infer"].get("ns", 0))
            for batch in model_stats.get("batch_stats", [])
        )
        / 1e9
    )
    return (
        int(model_stats.get("inference_count", 0)),
        int(model_stats.get("execution_count", 0)),
        compute,
    )


def _run(url: str, model: str, hu: npt.NDArray[np.generic], jobs: int, chunk: int) -> float:
    """Seconds for ``jobs`` jobs at once to get their labels."""
    clients = [TritonClient(url, 600) for _ in range(jobs)]
    start = threading.Barrier(jobs + 1)
    failures: list[BaseException] = []

    def job(client: TritonClient) -> None:
        start.wait()
        try:
            if model == HEURISTIC:
                spacing = np.array([2.5, 0.7, 0.7], dtype=np.float32)
                client.infer(model, {"CT_HU": hu, "SPACING_MM": spacing}, ("LUNG_LABELS",))
            else:
                client.infer(model, {"CT_HU": hu}, ("LUNG_LABELS",), slice_chunk=chunk)
        except BaseException as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=job, args=(c,)) for c in clients]
    for thread in threads:
        thread.start()
    start.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    for client in clients:
        client.close()
    if failures:
        raise failures[0]
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        settings = TritonSettings(
            model_repository=_repository(root),
            grpc_port=free_port(),
            http_port=free_port(),
            metrics_port=free_port(),
            request_timeout_s=600,
        )
        server = EmbeddedTriton(settings, root / "triton", models=(UNET, PLAIN, HEURISTIC))
        server.start()
        stats_client = TritonClient(settings.grpc_url, 60)
        try:
            phantom = write_chest_ct(root / "ct", slices=args.slices)
            hu = np.ascontiguousarray(
                load_series(list(phantom.paths), volume_type="int16").series.volume
            )
            spec = importlib.util.spec_from_file_location(
                "unet_model", REPO / "model_repository" / UNET / "1" / "model.py"
            )
            assert spec is not None
            assert spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            session = module.session(REPO / "model_repository" / UNET / "1" / "model.onnx")
            direct = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                for i in range(0, len(hu), args.chunk):
                    module.labels_of(session, hu[i : i + args.chunk])
                direct.append(time.perf_counter() - started)
            print(
                f"{args.slices} x 512 x 512, chunks of {args.chunk} slices, {args.repeats} repeats"
            )
            print(
                f"  onnxruntime in process, 1 job: {statistics.median(direct):.2f} s"
                f" ({statistics.median(direct) / len(hu) * 1000:.1f} ms a slice)"
            )
            _run(settings.grpc_url, UNET, hu[:32], 1, args.chunk)  # warm
            _run(settings.grpc_url, PLAIN, hu[:32], 1, args.chunk)
            for jobs in (1, args.jobs):
                for model in (UNET, PLAIN, HEURISTIC):
                    before = _stats(stats_client, model)
                    times = [
                        _run(settings.grpc_url, model, hu, jobs, args.chunk)
                        for _ in range(args.repeats)
                    ]
                    after = _stats(stats_client, model)
                    items = after[0] - before[0]
                    executions = after[1] - before[1]
                    compute = (after[2] - before[2]) / args.repeats
                    wall = statistics.median(times)
                    print(
                        f"  {model:<20} {jobs} job(s) at once: {wall:6.2f} s"
                        f" ({wall / (len(hu) * jobs) * 1000:5.1f} ms a slice),"
                        f" model compute {compute:6.2f} s,"
                        f" {executions} executions for {items} items"
                    )
        finally:
            stats_client.close()
            server.stop()


if __name__ == "__main__":
    main()
