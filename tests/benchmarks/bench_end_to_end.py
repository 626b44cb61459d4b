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
(transfer, (de)serialisation, queueing).

Memory: the gateway's process tree (listeners, job processes, tritonserver and its
Python-backend stubs) is sampled every 0.1 s while the study goes through. Printed:
the peak of the summed RSS and of the summed PSS (proportional set size: a page two
processes share, such as a shared memory region, is counted once over them, which
RSS counts in each), each also above the idle tree just before the study was sent;
and the job process's own peak (``inference.job.done``). PSS is what the host gives.

``--ingest-beside N`` sends, while the study's job runs, copies of the real head CT
(``tests/data/ct-head-tilt``, 30 instances, routed to no plugin when only ct_lung is
enabled) as new studies one after another over one association, up to N of them,
and the same copies once to the idle gateway before the study: the ingest rate
beside the job and alone, and that every instance of them was answered with success
(storescu fails otherwise).

``--reference REV`` runs the same study through the code of commit REV too (the
previous release; default the last commit before issue 14), interleaved with this
tree's runs, from a ``git archive`` of it.

    .venv/bin/python tests/benchmarks/bench_end_to_end.py --runs 3
    .venv/bin/python tests/benchmarks/bench_end_to_end.py --plugin ct_lung --transport grpc
    .venv/bin/python tests/benchmarks/bench_end_to_end.py --plugin ct_lung --slices 300 \
        --transport shared_memory --reference b1ddaee
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import pydicom
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
    PREVIOUS_RELEASE,
    REAL_DATA,
    Orthanc,
    TreeMemory,
    copy_as_new_study,
    infergate_config,
    infergate_of,
    reference_tree,
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


class _Beside(threading.Thread):
    """Sends ``studies`` one after another until told to stop or none is left; counts
    the instances answered and the time they took."""

    def __init__(self, port: int, studies: list[list[Path]]) -> None:
        super().__init__(daemon=True)
        self.port, self.studies = port, studies
        self.halt = threading.Event()
        self.sent, self.seconds = 0, 0.0
        self.error: Exception | None = None

    def finish(self) -> None:
        """Stop after the study being sent; raise if anything was refused."""
        self.halt.set()
        if self.is_alive():
            self.join(600)
        if self.error is not None:
            raise RuntimeError(f"ingest beside the job failed: {self.error}")

    def run(self) -> None:
        started = time.perf_counter()
        try:
            for study in self.studies:
                if self.halt.is_set():
                    break
                storescu(self.port, study)
                self.sent += len(study)
        except Exception as exc:  # reported by the run, which fails
            self.error = exc
        self.seconds = time.perf_counter() - started


def _head_studies(folder: Path, count: int, first: int = 0) -> list[list[Path]]:
    """``count`` copies of the real head CT, each a study of its own."""
    head = sorted((REAL_DATA / "ct-head-tilt").glob("*.dcm"))
    folder.mkdir(parents=True, exist_ok=True)
    return [copy_as_new_study(head, folder / str(first + i))[1] for i in range(count)]


def _send_rate(port: int, studies: list[list[Path]]) -> float:
    """Instances a second of ``studies`` sent in turn to an idle gateway."""
    started = time.perf_counter()
    for study in studies:
        storescu(port, study)
    return sum(len(s) for s in studies) / (time.perf_counter() - started)


def one_run(
    work: Path,
    plugin: str,
    *,
    model: str,
    paths: list[Path],
    transport: str,
    quiet_s: float,
    code: dict[str, str] | None = None,
    beside: int = 0,
) -> dict[str, float]:
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    config = infergate_config(work / "var", orthanc, quiet_s)
    config["plugins"] = {"enabled": [plugin]}
    config["triton"]["shared_memory"] = TRANSPORTS[transport]
    server = infergate_of(work / "ig", config, code)
    try:
        server.start()
        assert server.process is not None
        time.sleep(2.0)  # the forkserver's warm-up done
        alone, copies = (
            _head_studies(work / "beside", min(beside, 5)),
            _head_studies(work / "beside", beside, first=5),
        )
        idle_rate = _send_rate(server.port, alone) if alone else 0.0
        memory = TreeMemory(server.process.pid)
        memory.mark_idle()
        memory.start()
        started = time.perf_counter()
        storescu(server.port, paths)
        acknowledged_wall, acknowledged = time.time(), time.perf_counter()
        study = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        (complete,) = wait_until(
            lambda: [
                e
                for e in server.events()
                if e["event"] == "assembly.series.complete" and e["study_uid"] == study
            ],
            600,
            "the study's series complete",
        )
        sender = _Beside(server.port, copies)
        if copies:
            sender.start()
        wait_until(lambda: orthanc.find_instances(study, "SR"), 1800, "the SR in Orthanc", 0.02)
        stored = time.perf_counter()
        stored_wall = time.time()
        sender.finish()
        started_job = server.wait_event("inference.job.started", 5)[0]
        done = server.wait_event("inference.job.done", 5)[0]
        sent = server.wait_event("export.sent", 5)[0]
        compute = _model_compute_s(config["triton"]["grpc_port"], model)
        fallbacks = [
            e for e in server.events() if e["event"] == "inference.shared_memory.unavailable"
        ]
        measured = memory.stop()
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
        # The quiet time the series had when it completed (from its last instance's
        # commit, which comes before that instance's answer).
        "quiet_s": float(complete["quiet_s"]),
        **{k: float(done[k]) for k in STAGES},
        "triton_model_s": compute,
        "triton_transfer_s": inference - compute,
        "export_s": float(sent["duration_s"]),
        # Between the stages: the series complete to its job started; the job started
        # to its first stage plus its end to the outcome recorded (the job process's
        # start and exit, the result rows committed); the job done to its export
        # begun; the export sent to the SR found in Orthanc.
        "to_job_s": _timestamp(started_job) - _timestamp(complete),
        "job_process_s": _timestamp(done)
        - _timestamp(started_job)
        - sum(float(done[k]) for k in STAGES),
        "to_export_s": _timestamp(sent) - float(sent["duration_s"]) - _timestamp(done),
        "to_found_s": stored_wall - _timestamp(sent),
    }
    result.update(measured)
    if beside:
        result["beside_sent"] = float(sender.sent)
        result["beside_img_s"] = sender.sent / sender.seconds if sender.seconds else 0.0
        result["alone_img_s"] = idle_rate
    if "peak_memory_mib" in done:
        result["job_process_peak_mib"] = float(done["peak_memory_mib"])
    return result


def _print(title: str, results: list[dict[str, float]]) -> None:
    print(title)
    for key in results[0]:
        values = [r[key] for r in results]
        print(
            f"  {key:18s} median {statistics.median(values):7.3f}"
            f"  range {min(values):.3f}-{max(values):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=1.0)
    parser.add_argument("--plugin", choices=(*PLUGINS, "all"), default="all")
    parser.add_argument("--transport", choices=(*TRANSPORTS, "both"), default="both")
    parser.add_argument("--slices", type=int, default=100, help="ct_lung's phantom")
    parser.add_argument("--reference", default=None, help=f"a commit, e.g. {PREVIOUS_RELEASE}")
    parser.add_argument(
        "--ingest-beside", type=int, default=0, help="head CT studies sent while the job runs"
    )
    args = parser.parse_args()
    plugins = PLUGINS if args.plugin == "all" else (args.plugin,)
    transports = tuple(TRANSPORTS) if args.transport == "both" else (args.transport,)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes: dict[str, dict[str, str] | None] = {"this tree": None}
        if args.reference:
            codes[args.reference] = reference_tree(args.reference, root / "reference")
        for plugin in plugins:
            paths, what = _series(plugin, root / plugin, args.slices)
            for transport in transports:
                results: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
                for n in range(args.runs):  # interleaved: the machine's noise falls on both
                    for name, code in codes.items():
                        results[name].append(
                            one_run(
                                root / f"{plugin}-{transport}-{n}-{len(results[name])}-{id(code)}",
                                plugin,
                                model=MODELS[plugin],
                                paths=paths,
                                transport=transport,
                                quiet_s=args.quiet,
                                code=code,
                                beside=args.ingest_beside,
                            )
                        )
                for name, runs in results.items():
                    _print(
                        f"{plugin}, {what}, {name}, Triton inputs over {transport},"
                        f" {args.runs} runs, quiet period {args.quiet} s",
                        runs,
                    )


if __name__ == "__main__":
    main()
