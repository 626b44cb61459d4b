"""End-to-end latency and memory for the ct_lung path (run on demand, not in the suite).

For the 100-slice 512x512 phantom: time from the last instance's C-STORE response
(storescu returning) to the SR being stored in Orthanc, split into the stages the
server logs; and the peak RSS of the Infergate process and of its tritonserver
(with the Python-backend stub). The quiet period is part of the latency by design;
it is set here to 1 s (default 10 s) and reported separately.

    .venv/bin/python tests/benchmarks/bench_end_to_end.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.testing import write_chest_ct
from peers import (
    InfergateProcess,
    Orthanc,
    infergate_config,
    process_tree,
    storescu,
    wait_until,
)


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
        peaks[f"{name}[{current}]"] = _peak_rss_mib(current)
    return peaks


def one_run(work: Path, phantom_paths: list[Path], quiet_s: float) -> dict[str, float]:
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    server = InfergateProcess(work / "ig", infergate_config(work / "var", orthanc, quiet_s))
    server.workdir.mkdir(parents=True)
    try:
        server.start()
        started = time.perf_counter()
        storescu(server.port, phantom_paths)
        acknowledged = time.perf_counter()
        study = server.wait_event("assembly.series.complete", 60)[0]["study_uid"]
        wait_until(lambda: orthanc.find_instances(study, "SR"), 120, "the SR in Orthanc", 0.02)
        stored = time.perf_counter()
        done = server.wait_event("inference.job.done", 5)[0]
        sent = server.wait_event("export.sent", 5)[0]
        assert server.process is not None
        rss = _tree_peak_rss(server.process.pid)
    finally:
        server.stop()
        orthanc.stop()
    result = {
        "send_s": acknowledged - started,
        "ack_to_sr_s": stored - acknowledged,
        "quiet_period_s": quiet_s,
        **{k: float(v) for k, v in done.items() if k.endswith("_s")},
        "export_s": float(sent["duration_s"]),
    }
    for name, mib in rss.items():
        result[f"peak_rss_mib {name}"] = mib
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet", type=float, default=1.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        phantom = write_chest_ct(root / "phantom")
        results = [
            one_run(root / f"run{n}", list(phantom.paths), args.quiet) for n in range(args.runs)
        ]
    keys = [k for k in results[0] if not k.startswith("peak_rss")]
    print(f"{args.runs} runs, 100 x 512 x 512 CT phantom, quiet period {args.quiet} s")
    for key in keys:
        values = [r[key] for r in results]
        print(
            f"  {key:16s} median {statistics.median(values):7.3f}"
            f"  range {min(values):.3f}-{max(values):.3f}"
        )
    for r in results:
        rss = {k.split(" ", 1)[1]: round(v) for k, v in r.items() if k.startswith("peak_rss")}
        print(f"  peak RSS MiB: {rss}")


if __name__ == "__main__":
    main()
