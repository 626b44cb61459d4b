"""The gateway's own CPU work of a job, two jobs at once: on threads (as `serve` runs
them) against worker processes, with one job alone and two in turn as references
(run on demand, not in the suite).

The work is what a ct_lung job does in the gateway process, Triton's part left out:
build the volume from the spooled files, the plugin's preprocess and postprocess, and
the SEG + SR encoding. The model's label map is computed once beforehand. If the GIL
serialised the work, two threads would take as long as two jobs in turn; two
processes show what the cores allow.

    .venv/bin/python tests/benchmarks/bench_gil.py --slices 100 --rounds 3
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import numpy.typing as npt

from infergate.config import Settings
from infergate.inference.volume import load_series
from infergate.plugins import discover
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode
from infergate.testing import write_chest_ct
from peers import REPO

# What each job works on, set in every process by _init (a process pool's initializer).
_WORK: dict[str, Any] = {}


def _labels(paths: list[Path]) -> npt.NDArray[np.uint8]:
    """The ct_lung_seg model's output for the series, computed here once."""
    spec = importlib.util.spec_from_file_location(
        "lung_model", REPO / "model_repository" / "ct_lung_seg" / "1" / "model.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    series = load_series(paths).series
    hu = np.clip(np.rint(series.volume), -32768, 32767).astype(np.int16)
    labels: npt.NDArray[np.uint8] = module.segment_lungs(hu, np.asarray(series.spacing))
    return labels


def _init(paths: list[Path], labels: npt.NDArray[np.uint8]) -> None:
    _WORK.update(paths=paths, labels=labels)


def job(index: int) -> float:
    """One job's gateway work; returns its wall time."""
    started = time.perf_counter()
    settings = Settings()
    (plugin,) = [p for p in discover() if p.spec.name == "ct_lung"]
    loaded = load_series(_WORK["paths"], settings.volume)
    plugin.plugin.preprocess(loaded.series)
    findings = plugin.plugin.postprocess(loaded.series, {"LUNG_LABELS": _WORK["labels"]})
    identity = ResultIdentity(
        job_id=f"{index:032x}",
        uid_root=settings.results.uid_root,
        device=settings.results.device,
        seg_series_number=settings.results.seg_series_number,
        sr_series_number=settings.results.sr_series_number,
    )
    encode(loaded, findings, plugin.spec, identity)
    return time.perf_counter() - started


def _cpu_s() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def _timed(run: Callable[[], None]) -> tuple[float, float]:
    """(wall s, CPU s of this process and its children) of ``run``."""
    cpu, wall = _cpu_s(), time.perf_counter()
    run()
    return time.perf_counter() - wall, _cpu_s() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-gil-") as folder:
        phantom = write_chest_ct(Path(folder) / "ct", slices=args.slices)
        paths = list(phantom.paths)
        labels = _labels(paths)
        _init(paths, labels)
        job(0)  # highdicom's tables loaded, plugins discovered
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(2, context, initializer=_init, initargs=(paths, labels)) as pool:
            list(pool.map(job, range(2)))  # warm: each worker has loaded its modules

            def alone() -> None:
                job(1)

            def in_turn() -> None:
                job(1)
                job(2)

            def threads() -> None:
                workers = [threading.Thread(target=job, args=(n,)) for n in range(2)]
                for worker in workers:
                    worker.start()
                for worker in workers:
                    worker.join()

            def processes() -> None:
                list(pool.map(job, range(2)))

            modes = {
                "one job alone": alone,
                "two jobs in turn": in_turn,
                "two jobs on threads": threads,
                "two jobs on processes": processes,
            }
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in modes}
            for _ in range(args.rounds):
                for name, run in modes.items():
                    results[name].append(_timed(run))
    cores = os.cpu_count() or 1
    print(f"{args.slices} slices 512x512, {args.rounds} rounds, {cores} cores; medians")
    print(f"{'mode':<24}{'wall s':>8}{'CPU s':>8}{'cores busy':>12}")
    for name, samples in results.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        # Process-pool CPU is counted only when the workers exit: estimate from wall.
        busy = f"{cpu / wall:.2f}" if "processes" not in name else "-"
        print(f"{name:<24}{wall:>8.2f}{cpu:>8.2f}{busy:>12}")


if __name__ == "__main__":
    main()
