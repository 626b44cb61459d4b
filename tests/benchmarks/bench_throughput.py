"""Studies back to back: the time until the last result is in the PACS, each study's
latency, CPU use of the machine, and ingest while inference runs against idle ingest,
for this tree and a reference revision side by side (run on demand, not in the suite).

N chest CT phantoms (100 x 512 x 512) are sent with storescu, one association each,
one after another, to `infergate serve` (embedded Triton, ct_lung only, quiet period
1 s) with Orthanc as the PACS. A study's latency runs from its storescu returning to
its SR being in Orthanc. The reference revision runs from a `git archive` of it,
imported ahead of the installed tree through PYTHONPATH. After the last result, one
more phantom is sent to the idle gateway: its images/s against those of the studies
sent while jobs were running.

    .venv/bin/python tests/benchmarks/bench_throughput.py --studies 6 --reference 7ee359f
    .venv/bin/python tests/benchmarks/bench_throughput.py --per-plugin-slots 2
    .venv/bin/python tests/benchmarks/bench_throughput.py --reference 78b24ee --threads-too
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.testing import ChestPhantom, write_chest_ct
from peers import (
    InfergateProcess,
    Orthanc,
    infergate_config,
    reference_tree,
    storescu,
    wait_until,
)


@dataclass
class Run:
    label: str
    total_s: float  # first storescu starting to the last SR stored
    latencies_s: list[float]
    cpu_busy: float  # of all cores, over total_s (1.0 = every core busy)
    busy_ingest_ips: float  # images/s of the studies sent while jobs ran
    idle_ingest_ips: float


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of all cores, from /proc/stat."""
    fields = [float(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _run(
    label: str,
    studies: list[ChestPhantom],
    idle: ChestPhantom,
    root: Path,
    *,
    env: dict[str, str] | None = None,
    work: dict[str, int] | None = None,
) -> Run:
    slug = label.replace(" ", "-")  # tritonserver's Python backend splits paths on spaces
    orthanc = Orthanc(root / f"orthanc-{slug}")
    orthanc.start()
    config = infergate_config(root / f"var-{slug}", orthanc, quiet_s=1.0)
    config["plugins"] = {"enabled": ["ct_lung"]}
    if work:
        config["work"] = work
    server = InfergateProcess(root / f"infergate-{slug}", config, extra_env=env)
    server.workdir.mkdir()
    try:
        server.start()
        busy0, total0 = _cpu_times()
        started = time.monotonic()
        sent_at: dict[str, float] = {}
        send_seconds = []
        for study in studies:
            begin = time.monotonic()
            storescu(server.port, list(study.paths))
            sent_at[study.study_uid] = time.monotonic()
            send_seconds.append(sent_at[study.study_uid] - begin)
        stored_at: dict[str, float] = {}

        def all_stored() -> bool:
            for study in studies:
                if study.study_uid not in stored_at and orthanc.find_instances(
                    study.study_uid, "SR"
                ):
                    stored_at[study.study_uid] = time.monotonic()
            return len(stored_at) == len(studies)

        wait_until(all_stored, 900, "every study's SR in Orthanc", interval=0.2)
        total = max(stored_at.values()) - started
        busy1, total1 = _cpu_times()
        begin = time.monotonic()
        storescu(server.port, list(idle.paths))
        idle_s = time.monotonic() - begin
    finally:
        server.stop()
        orthanc.stop()
    images = len(studies[0].paths)
    return Run(
        label,
        total,
        [stored_at[s.study_uid] - sent_at[s.study_uid] for s in studies],
        (busy1 - busy0) / (total1 - total0),
        # The first study went to an idle gateway; the others arrived during jobs.
        images / statistics.median(send_seconds[1:]) if len(studies) > 1 else float("nan"),
        images / idle_s,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--reference", default="7ee359f", help="git revision to compare with")
    parser.add_argument(
        "--per-plugin-slots",
        type=int,
        help="also run this tree with work.per_plugin_slots set to this",
    )
    parser.add_argument(
        "--threads-too",
        action="store_true",
        help="also run this tree with its jobs on threads (work.job_processes: false)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        studies = [write_chest_ct(root / f"study-{i}") for i in range(args.studies)]
        idle = write_chest_ct(root / "idle")
        code = reference_tree(args.reference, root / "reference")
        env = {"PYTHONPATH": code["PYTHONPATH"]}
        runs = [
            _run(f"reference {args.reference}", studies, idle, root, env=env),
            _run("this tree", studies, idle, root),
        ]
        if args.per_plugin_slots:
            slots = args.per_plugin_slots
            work = {"per_plugin_slots": slots, "inference_slots": slots + 1}
            runs.append(
                _run(f"this tree, {slots} ct_lung jobs at once", studies, idle, root, work=work)
            )
        if args.threads_too:
            work = {"job_processes": False}
            runs.append(_run("this tree, jobs on threads", studies, idle, root, work=work))
    print(f"{args.studies} chest CT studies (100 x 512 x 512) back to back, ct_lung, quiet 1 s")
    print(
        "| | last result in the PACS | latency per study (median, max) | CPU busy (all cores)"
        " | ingest during jobs | ingest idle |"
    )
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(
            f"| {run.label} | {run.total_s:.1f} s | {statistics.median(run.latencies_s):.1f} s,"
            f" {max(run.latencies_s):.1f} s | {run.cpu_busy:.0%} | {run.busy_ingest_ips:.0f} img/s"
            f" | {run.idle_ingest_ips:.0f} img/s |"
        )
        print(f"|   latencies | {', '.join(f'{v:.1f}' for v in run.latencies_s)} s | | | | |")


if __name__ == "__main__":
    main()
