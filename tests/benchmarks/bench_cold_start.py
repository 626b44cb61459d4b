"""Cold start: from starting ``infergate serve`` to its first C-ECHO answered and to
``serve.ready``, with the embedded Triton and every plugin enabled (run on demand,
not in the suite).

Each run is a fresh server on a fresh state folder. From the moment the process is
started, DCMTK's echoscu is tried every 50 ms until one association is accepted;
``serve.ready`` is read from the server's log (its timestamp against the start).
``--timeline`` prints, for the first run, each log event's time since the start.

    .venv/bin/python tests/benchmarks/bench_cold_start.py --runs 3
    .venv/bin/python tests/benchmarks/bench_cold_start.py --runs 3 --reference b1ddaee
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from peers import PEER_ENV, PREVIOUS_RELEASE, infergate_config, reference_tree


def _echo(port: int) -> bool:
    done = subprocess.run(
        ["echoscu", "-to", "1", "-aec", "INFERGATE", "127.0.0.1", str(port)],
        env=PEER_ENV,
        capture_output=True,
        check=False,
    )
    return done.returncode == 0


def one_run(work: Path, code: dict[str, str] | None, timeline: bool = False) -> dict[str, float]:
    config = infergate_config(work / "var", None)
    config.pop("destinations", None)
    env = dict(PEER_ENV)
    if code is not None:
        config["triton"]["model_repository"] = code["MODEL_REPOSITORY"]
        env["PYTHONPATH"] = code["PYTHONPATH"]
    work.mkdir(parents=True)
    (work / "infergate.yaml").write_text(yaml.safe_dump(config))
    log = (work / "serve.log").open("wb")
    started_wall, started = time.time(), time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "infergate.cli", "serve", "--config", str(work / "infergate.yaml")],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    try:
        while not _echo(config["ingest"]["port"]):
            if process.poll() is not None or time.perf_counter() - started > 120:
                raise RuntimeError((work / "serve.log").read_text()[-3000:])
            time.sleep(0.05)
        echo_s = time.perf_counter() - started
        ready = None
        deadline = time.perf_counter() + 120
        while ready is None and time.perf_counter() < deadline:
            for line in (work / "serve.log").read_text().splitlines():
                event = _event(line)
                if event is not None and event["event"] == "serve.ready":
                    ready = datetime.fromisoformat(str(event["timestamp"])).timestamp()
            time.sleep(0.1)
    finally:
        process.terminate()
        process.wait(30)
        log.close()
    if timeline:
        for line in (work / "serve.log").read_text().splitlines():
            event = _event(line)
            if event is not None and "timestamp" in event:
                at = datetime.fromisoformat(str(event["timestamp"])).timestamp() - started_wall
                print(f"  {at:6.2f} s  {event['event']}")
        print(f"  {echo_s:6.2f} s  (first C-ECHO answered)")
    return {
        "first_echo_s": echo_s,
        "serve_ready_s": float("nan") if ready is None else ready - started_wall,
    }


def _event(line: str) -> dict[str, object] | None:
    try:
        parsed = json.loads(line)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and "event" in parsed else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--reference", default=None, help=f"a commit, e.g. {PREVIOUS_RELEASE}")
    parser.add_argument("--timeline", action="store_true", help="the first run's log events")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        codes: dict[str, dict[str, str] | None] = {"this tree": None}
        if args.reference:
            codes[args.reference] = reference_tree(args.reference, root / "reference")
        results: dict[str, list[dict[str, float]]] = {name: [] for name in codes}
        for n in range(args.runs):  # interleaved; folder names without spaces (Triton)
            for index, (name, code) in enumerate(codes.items()):
                first = args.timeline and n == 0
                if first:
                    print(f"{name}, run 1:")
                results[name].append(one_run(root / f"run-{n}-{index}", code, first))
        for name, runs in results.items():
            print(f"{name}, every plugin, embedded Triton, {args.runs} runs")
            for key in runs[0]:
                values = [r[key] for r in runs]
                print(
                    f"  {key:18s} median {statistics.median(values):6.2f}"
                    f"  range {min(values):.2f}-{max(values):.2f}"
                )


if __name__ == "__main__":
    main()
