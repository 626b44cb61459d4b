"""End-to-end latency per plugin, where the time goes, and shared memory against plain
gRPC (run on demand, not in the suite).

For each plugin, its test series (ct_lung: the 100-slice 512x512 chest phantom;
ct_head_bleed: the 32-slice head phantom with two hyperdensities; cxr_quality: a
2500x2048 chest radiograph) is sent with storescu to `infergate serve` (embedded
Triton, only that plugin enabled), with Triton's inputs through system shared memory
and then inside the gRPC message. Measured: the last C-STORE response (storescu
returning) to the SR stored in Orthanc, split into the assembly wait (quiet period
included, set here to 1 s; default 10 s), the stages the server logs (volume build,
preprocess, Triton request, postprocess, encoding, writing, export), and the Triton
request split with Triton's own statistics into the model's compute and the rest
(transfer, (de)serialisation, queueing). Peak RSS of each process is printed too.

    .venv/bin/python tests/benchmarks/bench_end_to_end.py --runs 3
    .venv/bin/python tests/benchmarks/bench_end_to_end.py --plugin ct_lung --transport grpc
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import tritonclient.grpc as grpcclient

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.testing import (
    LEFT_FRONTAL,
    RIGHT_PARIETAL,
    write_chest_ct,
    write_chest_radiograph,
    write_head_ct,
)
from peers import (
    InfergateProcess,
    Orthanc,
    infergate_config,
    process_tree,
    storescu,
    wait_until,
)

MODELS = {"ct_lung": "ct_lung_seg", "ct_head_bleed": "ct_head_bleed", "cxr_quality": "cxr_quality"}
PLUGINS = tuple(MODELS)
TRANSPORTS = {"shared_memory": "on", "grpc": "off"}
STAGES = ("volume_s", "preprocess_s", "inference_s", "postprocess_s", "encode_s", "write_s")


def _series(plugin: str, folder: Path, slices: int) -> tuple[list[Path], str]:
    """The plugin's test series and a line that says what it is."""
    if plugin == "ct_lung":
        paths = write_chest_ct(folder, slices=slices).paths
        return list(paths), f"chest CT phantom, {slices} x 512 x 512"
    if plugin == "ct_head_bleed":
        head = write_head_ct(folder, (RIGHT_PARIETAL, LEFT_FRONTAL))
        return list(head.paths), "head CT phantom with 2 hyperdensities, 32 x 256 x 256"
    radiograph = write_chest_radiograph(folder, rows=2500, columns=2048, pixel_spacing=0.15)
    return [radiograph.path], "chest radiograph phantom, DX, 2500 x 2048"


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _tree_peak_rss(pid: int) -> dict[str, float]:
    """Peak RSS of ``pid`` and every descendant, by command name."""
    peaks: dict[str, float] = {}
    for current in process_tree(pid):
        name = Path(f"/proc/{current}/comm").read_text().strip()
        peaks[name] = max(peaks.get(name, 0.0), _peak_rss_mib(current))
    return peaks


def _model_compute_s(grpc_port: int, model: str) -> float:
    """Triton's own time for the model's one request: compute input, infer, output."""
    client = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")
    try:
        stats = client.get_inference_statistics(model, as_json=True)["model_stats"][0]
    finally:
        client.close()
    inference = stats["inference_stats"]
    count = int(inference["success"].get("count", 1)) or 1
    total_ns = sum(
        int(inference[key].get("ns", 0))
        for key in ("compute_input", "compute_infer", "compute_output")
    )
    return total_ns / count / 1e9


def _timestamp(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["timestamp"])).timestamp()


def one_run(
    work: Path, plugin: str, *, model: str, paths: list[Path], transport: str, quiet_s: float
) -> dict[str, float]:
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    config = infergate_config(work / "var", orthanc, quiet_s)
    config["plugins"] = {"enabled": [plugin]}
    config["triton"]["shared_memory"] = TRANSPORTS[transport]
    server = InfergateProcess(work / "ig", config)
    server.workdir.mkdir(parents=True)
    try:
        server.start()
        started = time.perf_counter()
        storescu(server.port, paths)
        acknowledged_wall, acknowledged = time.time(), time.perf_counter()
        complete = server.wait_event("assembly.series.complete", 60)[0]
        study = complete["study_uid"]
        wait_until(lambda: orthanc.find_instances(study, "SR"), 180, "the SR in Orthanc", 0.02)
        stored = time.perf_counter()
        done = server.wait_event("inference.job.done", 5)[0]
        sent = server.wait_event("export.sent", 5)[0]
        compute = _model_compute_s(config["triton"]["grpc_port"], model)
        fallbacks = [e for e in server.events() if e["event"].startswith("inference.shared_memory")]
        assert server.process is not None
        rss = _tree_peak_rss(server.process.pid)
    finally:
        server.stop()
        orthanc.stop()
    if transport == "shared_memory" and fallbacks:
        raise RuntimeError(f"shared memory was not used: {fallbacks}")
    inference = float(done["inference_s"])
    result = {
        "send_s": acknowledged - started,
        "ack_to_sr_s": stored - acknowledged,
        "assembly_wait_s": _timestamp(complete) - acknowledged_wall,
        **{k: float(done[k]) for k in STAGES},
        "triton_model_s": compute,
        "triton_transfer_s": inference - compute,
        "export_s": float(sent["duration_s"]),
    }
    for name, mib in rss.items():
        result[f"peak_rss_mib {name}"] = mib
    return result


def _print(title: str, results: list[dict[str, float]]) -> None:
    print(title)
    for key in (k for k in results[0] if not k.startswith("peak_rss")):
        values = [r[key] for r in results]
        print(
            f"  {key:18s} median {statistics.median(values):7.3f}"
            f"  range {min(values):.3f}-{max(values):.3f}"
        )
    for r in results:
        rss = {k.split(" ", 1)[1]: round(v) for k, v in r.items() if k.startswith("peak_rss")}
        print(f"  peak RSS MiB: {rss}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=1.0)
    parser.add_argument("--plugin", choices=(*PLUGINS, "all"), default="all")
    parser.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="both")
    parser.add_argument("--slices", type=int, default=100, help="ct_lung's phantom")
    args = parser.parse_args()
    plugins = PLUGINS if args.plugin == "all" else (args.plugin,)
    transports = tuple(TRANSPORTS) if args.transport == "both" else (args.transport,)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for plugin in plugins:
            paths, what = _series(plugin, root / plugin, args.slices)
            for transport in transports:
                results = [
                    one_run(
                        root / f"{plugin}-{transport}-{n}",
                        plugin,
                        model=MODELS[plugin],
                        paths=paths,
                        transport=transport,
                        quiet_s=args.quiet,
                    )
                    for n in range(args.runs)
                ]
                _print(
                    f"{plugin}, {what}, Triton inputs over {transport}, {args.runs} runs,"
                    f" quiet period {args.quiet} s",
                    results,
                )


if __name__ == "__main__":
    main()
