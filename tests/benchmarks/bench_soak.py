"""Many studies one after another through one gateway: does its memory stay flat?
(run on demand, not in the suite).

``--studies N`` phantom studies (each with UIDs of its own; the head CT phantom with
two hyperdensities, 32 x 256 x 256, for ``ct_head_bleed``; the chest phantom of
``--slices`` slices for ``ct_lung``) are sent with storescu to one `infergate serve`
(embedded Triton, that plugin alone, quiet period 1 s, Orthanc as the PACS), each once
the previous one's SR is in Orthanc. The process tree (gateway, listeners, job
processes, tritonserver and its Python-backend stubs) is sampled every 0.2 s. For
each study: the tree's PSS when it is done (idle again), the tree's peak PSS while
it went through, and its job process's own peak (``inference.job.done``). Printed
for the first study, the 10th, the middle and the last, and the slope of the idle
PSS from the 10th study to the last (MiB per study: flat is about 0).

``--reference REV`` runs the same number of studies through the code of commit REV,
after this tree's.

    .venv/bin/python tests/benchmarks/bench_soak.py --studies 50
    .venv/bin/python tests/benchmarks/bench_soak.py --studies 50 --plugin ct_lung --slices 300
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.testing import LEFT_FRONTAL, RIGHT_PARIETAL, write_chest_ct, write_head_ct
from peers import (
    PREVIOUS_RELEASE,
    Orthanc,
    TreeMemory,
    infergate_config,
    infergate_of,
    reference_tree,
    storescu,
    wait_until,
)


def _study(plugin: str, folder: Path, slices: int) -> tuple[list[Path], str]:
    """A new phantom study for ``plugin`` (new UIDs each time) and its Study UID."""
    if plugin == "ct_lung":
        chest = write_chest_ct(folder, slices=slices)
        return list(chest.paths), chest.study_uid
    head = write_head_ct(folder, (RIGHT_PARIETAL, LEFT_FRONTAL))
    return list(head.paths), head.study_uid


class _Sampler(threading.Thread):
    """The tree's PSS (MiB) every ``interval_s``, with the time of each sample."""

    def __init__(self, tree: TreeMemory, interval_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.tree, self.interval_s = tree, interval_s
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            self.samples.append((time.perf_counter(), self.tree.sample()[1] / 1024))

    def peak_since(self, since: float) -> float:
        return max((pss for at, pss in self.samples if at >= since), default=float("nan"))

    def stop(self) -> None:
        self._halt.set()
        self.join()


def soak(
    work: Path, plugin: str, studies: int, slices: int, code: dict[str, str] | None
) -> list[dict[str, float]]:
    """Each study's idle PSS after it, peak PSS during it and job process peak (MiB)."""
    orthanc = Orthanc(work / "orthanc")
    orthanc.start()
    config = infergate_config(work / "var", orthanc, 1.0)
    config["plugins"] = {"enabled": [plugin]}
    server = infergate_of(work / "ig", config, code)
    rows: list[dict[str, float]] = []
    try:
        server.start()
        assert server.process is not None
        time.sleep(2.0)  # the forkserver's warm-up done
        tree = TreeMemory(server.process.pid)
        sampler = _Sampler(tree)
        sampler.start()
        idle_before = tree.sample()[1] / 1024
        for number in range(1, studies + 1):
            folder = work / f"study-{number}"
            paths, study_uid = _study(plugin, folder, slices)
            started = time.perf_counter()
            storescu(server.port, paths)
            wait_until(lambda s=study_uid: orthanc.find_instances(s, "SR"), 300, "the SR", 0.05)
            done = server.wait_event("inference.job.done", 30, count=number)[number - 1]
            time.sleep(0.5)  # the job process gone, the tree idle again
            rows.append(
                {
                    "idle_pss_mib": tree.sample()[1] / 1024,
                    "peak_pss_mib": sampler.peak_since(started),
                    "job_peak_mib": float(done.get("peak_memory_mib", float("nan"))),
                }
            )
            shutil.rmtree(folder)
        sampler.stop()
    finally:
        server.stop()
        orthanc.stop()
    rows.insert(0, {"idle_pss_mib": idle_before, "peak_pss_mib": idle_before, "job_peak_mib": 0})
    return rows


def _print(title: str, rows: list[dict[str, float]]) -> None:
    studies = len(rows) - 1
    print(title)
    print(f"  before the first study: tree PSS {rows[0]['idle_pss_mib']:7.1f} MiB")
    for number in sorted({1, min(10, studies), max(1, studies // 2), studies}):
        row = rows[number]
        print(
            f"  after study {number:3d}: tree PSS {row['idle_pss_mib']:7.1f} MiB,"
            f" its peak {row['peak_pss_mib']:7.1f} MiB, job process {row['job_peak_mib']:5.0f} MiB"
        )
    tail = range(min(10, studies), studies + 1)
    if len(tail) >= 2:
        slope = np.polyfit(list(tail), [rows[n]["idle_pss_mib"] for n in tail], 1)[0]
        print(f"  idle PSS from study {tail[0]} to {studies}: {slope:+.2f} MiB per study")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--plugin", choices=("ct_head_bleed", "ct_lung"), default="ct_head_bleed")
    parser.add_argument("--slices", type=int, default=100, help="ct_lung's phantom")
    parser.add_argument("--reference", default=None, help=f"a commit, e.g. {PREVIOUS_RELEASE}")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (the logs)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) if args.keep is None else args.keep
        codes: dict[str, dict[str, str] | None] = {"this tree": None}
        if args.reference:
            codes[args.reference] = reference_tree(args.reference, root / "reference")
        what = (
            f"chest CT phantom, {args.slices} x 512 x 512"
            if args.plugin == "ct_lung"
            else "head CT phantom, 32 x 256 x 256"
        )
        for index, (name, code) in enumerate(codes.items()):
            rows = soak(root / f"run-{index}", args.plugin, args.studies, args.slices, code)
            _print(f"{args.plugin}, {args.studies} studies ({what}), {name}", rows)


if __name__ == "__main__":
    main()
