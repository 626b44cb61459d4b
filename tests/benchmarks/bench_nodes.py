"""Gateway nodes on this machine: ingest and end-to-end throughput with 1, 2 and 3 nodes
on PostgreSQL, beside 1 node on SQLite (the embedded default) in the same run, and the
database statements per instance, per job and per idle second.

Each configuration starts fresh: its nodes (``serve``, one listener process each,
sharing one spool folder and, on PostgreSQL, one database) with one tritonserver of
the bench's own (remote mode, as on a GPU host) and Orthanc as the PACS. Then:

* idle: statements a second with nothing to do (the stage loops' polls, the beats);
* ingest: a ``--slices``-slice 512x512 CT split over two storescu associations per
  node, all at once: images/s and MB/s, from the first association to the last
  acknowledgement (the quiet period is longer than the sending, so no job runs);
* end to end: ``--studies`` head CTs (32 slices of 256x256, one job each), sent to
  the nodes in turn by one sender per node: studies a minute, from the first
  instance sent to the last SR in Orthanc.

PostgreSQL runs with ``fsync=on`` (the test suite's runs without) and
pg_stat_statements counts every statement our sessions send, BEGIN and COMMIT
included: each is one round trip, except those of one ``executemany``, which psycopg
sends in a pipeline (so the counts are an upper bound on round trips). Everything
shares this machine's cores: the nodes, PostgreSQL, Triton, Orthanc and storescu.

    .venv/bin/python tests/benchmarks/bench_nodes.py [--slices 200] [--studies 12]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psycopg
from postgres import PostgresServer, start_postgres

from infergate.inference.embedded import EmbeddedTriton
from infergate.testing import LEFT_FRONTAL, RIGHT_PARIETAL, write_chest_ct, write_head_ct
from peers import (
    REPO,
    InfergateProcess,
    Orthanc,
    free_port,
    infergate_config,
    storescu,
    triton_settings,
    wait_until,
)

QUIET_S = 4.0


@dataclass
class Measured:
    backend: str
    nodes: int
    idle_statements_per_s: float | None
    ingest_images_per_s: float
    ingest_mb_per_s: float
    statements_per_instance: float | None
    studies_per_min: float
    statements_per_job: float | None


def _statements(url: str | None) -> int | None:
    if url is None:
        return None
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT COALESCE(SUM(calls), 0) FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    return int(row[0]) if row else 0


def _nodes(
    root: Path, count: int, url: str | None, triton: EmbeddedTriton, orthanc: Orthanc
) -> list[InfergateProcess]:
    nodes = []
    for index in range(count):
        config = infergate_config(root / "var", orthanc, quiet_s=QUIET_S)
        config["node"] = {"name": f"node-{index}"}
        if url is not None:
            config["storage"]["database_url"] = url
        config["ingest"]["processes"] = 1
        config["plugins"] = {"enabled": ["ct_head_bleed"]}
        config["triton"] = {
            "mode": "remote",
            "urls": [triton.url],
            "model_repository": str(REPO / "model_repository"),
        }
        config["ops"] = {"port": free_port()}
        node = InfergateProcess(root / f"node-{index}", config)
        node.workdir.mkdir(parents=True)
        nodes.append(node)
    return nodes


def _concurrently(jobs: list[tuple[int, list[Path]]]) -> None:
    threads = [threading.Thread(target=storescu, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


@dataclass
class Peers:
    """What every configuration shares: PostgreSQL, Triton, Orthanc, the chest CT."""

    postgres: PostgresServer
    triton: EmbeddedTriton
    orthanc: Orthanc
    chest: list[Path]


def _measure(
    peers: Peers, backend: str, count: int, heads: list[tuple[str, list[Path]]]
) -> Measured:
    root = Path(tempfile.mkdtemp(prefix=f"bench-nodes-{backend}-{count}-"))
    chest, orthanc = peers.chest, peers.orthanc
    url = None
    if backend == "postgresql":
        url = peers.postgres.new_database()
        with psycopg.connect(url, autocommit=True) as db:
            db.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    nodes = _nodes(root, count, url, peers.triton, orthanc)
    try:
        starting = [threading.Thread(target=n.start) for n in nodes]
        for thread in starting:
            thread.start()
        for thread in starting:
            thread.join()
        time.sleep(5.0)  # past the start: the forkservers warm, the first beats
        before, started = _statements(url), time.monotonic()
        time.sleep(10.0)
        idle_rate = None
        if before is not None:
            idle_rate = ((_statements(url) or 0) - before) / (time.monotonic() - started)

        # Ingest: two associations a node, at once.
        parts = [chest[k :: 2 * count] for k in range(2 * count)]
        jobs = [(nodes[k % count].port, part) for k, part in enumerate(parts)]
        before, started = _statements(url), time.monotonic()
        _concurrently(jobs)
        ingest_s = time.monotonic() - started
        ingest_statements = None if before is None else (_statements(url) or 0) - before
        size = sum(p.stat().st_size for p in chest)
        # Its job runs and its results go out before the next phase.
        wait_until(lambda: _all_done(nodes, 1), 300, "the chest's job")
        time.sleep(QUIET_S)

        # End to end: the head studies, one sender a node, each sending its share in turn.
        shares: list[list[tuple[str, list[Path]]]] = [heads[k::count] for k in range(count)]
        before, started = _statements(url), time.monotonic()
        senders = [
            threading.Thread(target=_send_each, args=(node.port, share))
            for node, share in zip(nodes, shares, strict=True)
        ]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        wait_until(
            lambda: all(orthanc.find_instances(study, "SR") for study, _ in heads),
            900,
            "every study's SR",
        )
        e2e_s = time.monotonic() - started
        e2e_statements = None if before is None else (_statements(url) or 0) - before
    finally:
        for node in nodes:
            node.stop()
    per_instance = None
    per_job = None
    if ingest_statements is not None and e2e_statements is not None and idle_rate is not None:
        per_instance = (ingest_statements - idle_rate * ingest_s) / len(chest)
        instances = sum(len(paths) for _, paths in heads)
        per_job = (e2e_statements - idle_rate * e2e_s - per_instance * instances) / len(heads)
    shutil.rmtree(root, ignore_errors=True)
    return Measured(
        backend,
        count,
        None if idle_rate is None else round(idle_rate, 1),
        round(len(chest) / ingest_s, 1),
        round(size / ingest_s / 1e6, 1),
        None if per_instance is None else round(per_instance, 1),
        round(len(heads) / e2e_s * 60, 1),
        None if per_job is None else round(per_job, 1),
    )


def _send_each(port: int, studies: list[tuple[str, list[Path]]]) -> None:
    for _, paths in studies:
        storescu(port, paths)


def _all_done(nodes: list[InfergateProcess], jobs: int) -> bool:
    events = [e for node in nodes for e in node.events()]
    delivered: int = sum(e["event"] == "export.delivered" for e in events)
    return delivered >= jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--studies", type=int, default=12)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 2, 3])
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="bench-nodes-data-"))
    chest = list(write_chest_ct(data / "chest", slices=args.slices).paths)
    triton = EmbeddedTriton(
        triton_settings(REPO / "model_repository"), data / "triton", models=("ct_head_bleed",)
    )
    postgres = start_postgres("fsync=on", "shared_preload_libraries=pg_stat_statements")
    orthanc = Orthanc(data / "orthanc")
    results = []
    try:
        triton.launch()
        triton.wait_ready()
        orthanc.start()
        configurations = [("sqlite", 1)] + [("postgresql", n) for n in args.nodes]
        for backend, count in configurations:
            heads = []
            for number in range(args.studies):
                head = write_head_ct(
                    data / f"head-{backend}-{count}-{number}", (RIGHT_PARIETAL, LEFT_FRONTAL)
                )
                heads.append((head.study_uid, list(head.paths)))
            measured = _measure(Peers(postgres, triton, orthanc, chest), backend, count, heads)
            results.append(measured)
            print(json.dumps(measured.__dict__), flush=True)
    finally:
        orthanc.stop()
        triton.stop()
        postgres.stop()
        shutil.rmtree(postgres.root, ignore_errors=True)
        shutil.rmtree(data, ignore_errors=True)
    _table(results)


def _table(results: list[Measured]) -> None:
    def shown(value: Any) -> str:
        return "-" if value is None else str(value)

    print()
    print(
        "| state | nodes | ingest images/s | MB/s | studies/min | statements/instance"
        " | statements/job | idle statements/s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in results:
        print(
            f"| {m.backend} | {m.nodes} | {m.ingest_images_per_s} | {m.ingest_mb_per_s}"
            f" | {m.studies_per_min} | {shown(m.statements_per_instance)}"
            f" | {shown(m.statements_per_job)} | {shown(m.idle_statements_per_s)} |"
        )


if __name__ == "__main__":
    main()
