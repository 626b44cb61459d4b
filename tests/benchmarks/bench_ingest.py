"""Ingest throughput: Infergate beside DCMTK's storescp and Orthanc, in the same run.

A 300-slice 512x512 CT (the synthetic phantom, ~157 MB) is split over 1, 4 and 8
concurrent storescu associations; each receiver starts fresh for each measurement,
in a rotating order, after an ``os.sync()`` so that none pays for the write-back of
the one before (storescp and Orthanc leave their files to the kernel). Reported:
images/s, MB/s, the receiver's CPU seconds (all its processes), and the ratio to
storescp. Infergate acknowledges only after fsync of file and folder and a SQLite
commit; storescp does not fsync (it is the upper bound); Orthanc runs with its
Debian defaults (strace shows one fdatasync per instance, and no folder fsync).
Infergate runs as `infergate serve` with a quiet period long enough that no job
starts during the measurement, measured once its process tree is idle (after
``serve.ready`` the forkserver may still be warming up).

``--reference REV`` adds the Infergate of commit REV (the previous release), from a
``git archive`` of it, as one more receiver in the same rotation.

    .venv/bin/python tests/benchmarks/bench_ingest.py --repeats 3
    .venv/bin/python tests/benchmarks/bench_ingest.py --repeats 3 --reference b1ddaee
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infergate.testing import write_chest_ct
from peers import (
    PEER_ENV,
    PREVIOUS_RELEASE,
    Orthanc,
    free_port,
    infergate_config,
    infergate_of,
    process_tree,
    reference_tree,
    require_program,
    wait_until,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of ``pid`` and its live descendants, plus reaped children."""
    total = 0.0
    for current in process_tree(pid):
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime, cutime, cstime are fields 14-17 of stat (11-14 after the name).
        total += sum(int(v) for v in fields[11:15]) / CLOCK_TICKS
    return total


def _until_idle(pid: int, timeout_s: float = 60.0) -> None:
    """Wait until the tree of ``pid`` uses under 10% of a core: ``serve.ready`` comes
    before the forkserver has warmed up and Triton's stubs have settled, and what
    they do is not ingest."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        before = _cpu_seconds(pid)
        time.sleep(0.5)
        if _cpu_seconds(pid) - before < 0.05:
            return
    raise RuntimeError(f"process {pid} and its children did not go idle in {timeout_s} s")


Receiver = tuple[int, int, Callable[[], int]]  # port, pid, how many instances it stored


@contextmanager
def storescp(work: Path) -> Iterator[Receiver]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    process = subprocess.Popen(
        [require_program("storescp"), "--fork", "-od", str(out), "-aet", "INFERGATE", str(port)],
        env=PEER_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    yield port, process.pid, lambda: len(list(out.iterdir()))
    process.terminate()
    process.wait()


@contextmanager
def orthanc(work: Path) -> Iterator[Receiver]:
    pacs = Orthanc(work / "orthanc", ae_title="INFERGATE")
    pacs.start()
    assert pacs.process is not None
    yield pacs.dicom_port, pacs.process.pid, lambda: int(pacs.get("/statistics")["CountInstances"])
    pacs.stop()


@contextmanager
def infergate(work: Path, code: dict[str, str] | None = None) -> Iterator[Receiver]:
    """This tree's ``infergate serve``, or (``code``, from :func:`reference_tree`) that
    of another commit."""
    config = infergate_config(work / "var", None, quiet_s=3600)
    server = infergate_of(work / "ig", config, code)
    server.start()
    assert server.process is not None
    _until_idle(server.process.pid)
    spool = work / "var" / "spool" / "instances"
    yield server.port, server.process.pid, lambda: len(list(spool.iterdir()))
    server.stop()


RECEIVERS: dict[str, Callable[[Path], AbstractContextManager[Receiver]]] = {
    "storescp": storescp,
    "orthanc": orthanc,
    "infergate": infergate,
}


def send(port: int, files: list[Path], associations: int) -> float:
    """Send ``files`` split over concurrent storescu processes; seconds until all done."""
    chunks = [files[i::associations] for i in range(associations)]
    binary = require_program("storescu")
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                binary,
                "-aet",
                "SCANNER1",
                "-aec",
                "INFERGATE",
                "127.0.0.1",
                str(port),
                *[str(f) for f in chunk],
            ],
            env=PEER_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for chunk in chunks
    ]
    for process in processes:
        _, err = process.communicate(timeout=600)
        if process.returncode != 0:
            raise RuntimeError(f"storescu failed: {err.decode()[-500:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--reference", default=None, help=f"a commit, e.g. {PREVIOUS_RELEASE}")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        receivers = dict(RECEIVERS)
        if args.reference:
            code = reference_tree(args.reference, root / "reference")
            receivers[f"ig@{args.reference[:7]}"] = partial(infergate, code=code)
        phantom = write_chest_ct(root / "ct", slices=args.slices)
        files = list(phantom.paths)
        megabytes = sum(f.stat().st_size for f in files) / 1e6
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        run = 0
        names = list(receivers)
        for repeat in range(args.repeats):
            for associations in (1, 4, 8):
                # Interleaved, as the machine is noisy, and in a rotating order.
                order = names[repeat % len(names) :] + names[: repeat % len(names)]
                for name in order:
                    receiver = receivers[name]
                    # What the previous receiver left unsynced (storescp and Orthanc do not
                    # fsync) would otherwise be written back during the next measurement.
                    os.sync()
                    run += 1
                    work = root / f"run{run}"
                    work.mkdir()
                    with receiver(work) as (port, pid, stored):
                        cpu_before = _cpu_seconds(pid)
                        seconds = send(port, files, associations)
                        cpu = _cpu_seconds(pid) - cpu_before
                        # Count what was stored: storescu can exit 0 when some failed.
                        wait_until(lambda s=stored: s() == len(files), 30, f"{name}'s count")
                    results.setdefault((name, associations), []).append((seconds, cpu))
        print(f"{len(files)} images, {megabytes:.0f} MB, {args.repeats} repeats (median, range)")
        for associations in (1, 4, 8):

            def rate_of(name: str, count: int = associations) -> float:
                return statistics.median(len(files) / s for s, _ in results[(name, count)])

            for name in receivers:
                runs = results[(name, associations)]
                rates = [len(files) / s for s, _ in runs]
                rate = statistics.median(rates)
                cpu = statistics.median(c for _, c in runs)
                print(
                    f"  {associations} assoc  {name:11s} {rate:6.0f} img/s"
                    f" ({min(rates):.0f}-{max(rates):.0f})  {rate * megabytes / len(files):6.1f}"
                    f" MB/s  cpu {cpu:5.1f} s  of storescp {rate / rate_of('storescp'):4.2f}x"
                    f"  of orthanc {rate / rate_of('orthanc'):4.2f}x"
                )


if __name__ == "__main__":
    main()
