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
included. Round trips are the statements less one for each write transaction (its
BEGIN travels with its advisory lock); the statements of one ``executemany`` go in a
pipeline, so that is still an upper bound. What the stage loops' polls send while
idle (measured first, for 10 s) is taken out of the per-instance and per-job counts.
Everything shares this machine's cores: the nodes, PostgreSQL, Triton, Orthanc and
storescu.

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
    ingest_images_per_s: float
    ingest_mb_per_s: float
    studies_per_min: float
    # (statements, round trips); None on SQLite
    per_instance: tuple[float, float] | None
    per_job: tuple[float, float] | None
    idle_per_s: tuple[float, float] | None


def _statements(url: str | None) -> Counts | None:
    """Statements and round trips our sessions sent so far: a write transaction's
    BEGIN goes with its advisory lock, so it takes one round trip fewer."""
    if url is None:
        return None
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT COALESCE(SUM(calls), 0),"
            " COALESCE(SUM(calls) FILTER (WHERE query LIKE '%pg_advisory_xact_lock%'), 0)"
            " FROM pg_stat_statements"
            " WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"
        ).fetchone()
    statements, writes = (int(row[0]), int(row[1])) if row else (0, 0)
    return Counts(statements, statements - writes)


@dataclass(frozen=True)
class Counts:
    statements: int
    round_trips: int

    def __sub__(self, other: Counts) -> Counts:
        return Counts(self.statements - other.statements, self.round_trips - other.round_trips)


def _nodes(
    root: Path, count: int, url: str | None, triton: EmbeddedTriton, orthanc: Orthanc
) -> list[InfergateProcess]:
    nodes = []
    for index in range(count):
        config = infergate_config(root / "var", orthanc, quiet_s=QUIET_S)
        config["node"] = {"name": f"node-{index}"}
        del config["assembly"]["poll_interval_s"]  # the default's polls, not the tests' faster ones
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
        idle = _Phase(url)
        time.sleep(10.0)
        idle.end()

        # Ingest: two associations a node, at once.
        parts = [chest[k :: 2 * count] for k in range(2 * count)]
        ingest = _Phase(url)
        _concurrently([(nodes[k % count].port, part) for k, part in enumerate(parts)])
        ingest.end()
        size = sum(p.stat().st_size for p in chest)
        # No plugin runs on it (only the head one is enabled): it completes, unmatched.
        wait_until(lambda: _seen(nodes, "routing.series.unmatched"), 120, "the chest complete")

        # End to end: the head studies, one sender a node, each sending its share in turn.
        shares: list[list[tuple[str, list[Path]]]] = [heads[k::count] for k in range(count)]
        e2e = _Phase(url)
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
        e2e.end()
    finally:
        for node in nodes:
            node.stop()
    shutil.rmtree(root, ignore_errors=True)
    instances = sum(len(paths) for _, paths in heads)
    per_instance = ingest.per(len(chest), idle)
    return Measured(
        backend,
        count,
        round(len(chest) / ingest.seconds, 1),
        round(size / ingest.seconds / 1e6, 1),
        round(len(heads) / e2e.seconds * 60, 1),
        per_instance,
        e2e.per(len(heads), idle, per_instance, instances),
        idle.per_second(),
    )


class _Phase:
    """A phase of the run: its seconds, and what our sessions sent meanwhile."""

    def __init__(self, url: str | None) -> None:
        self._url = url
        self._before = _statements(url)
        self._started = time.monotonic()
        self.seconds = 0.0
        self.sent: Counts | None = None

    def end(self) -> None:
        self.seconds = time.monotonic() - self._started
        after = _statements(self._url)
        if after is not None and self._before is not None:
            self.sent = after - self._before

    def per_second(self) -> tuple[float, float] | None:
        """(statements, round trips) a second."""
        if self.sent is None:
            return None
        return (
            round(self.sent.statements / self.seconds, 1),
            round(self.sent.round_trips / self.seconds, 1),
        )

    def per(
        self,
        count: int,
        idle: _Phase,
        each: tuple[float, float] | None = None,
        items: int = 0,
    ) -> tuple[float, float] | None:
        """(statements, round trips) for each of ``count``, less what the idle polls sent
        meanwhile and ``each`` for each of ``items`` (the instances of the studies)."""
        rate = idle.per_second()
        if self.sent is None or rate is None:
            return None
        spent = (self.sent.statements, self.sent.round_trips)
        less = each or (0.0, 0.0)
        return (
            round((spent[0] - rate[0] * self.seconds - less[0] * items) / count, 1),
            round((spent[1] - rate[1] * self.seconds - less[1] * items) / count, 1),
        )


def _send_each(port: int, studies: list[tuple[str, list[Path]]]) -> None:
    for _, paths in studies:
        storescu(port, paths)


def _seen(nodes: list[InfergateProcess], event: str) -> bool:
    return any(e["event"] == event for node in nodes for e in node.events())


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
    def shown(value: tuple[float, float] | None) -> str:
        return "-" if value is None else f"{value[0]}, {value[1]}"

    print()
    print(
        "| state | nodes | ingest images/s | MB/s | studies/min"
        " | per instance | per job | idle, a second |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in results:
        print(
            f"| {m.backend} | {m.nodes} | {m.ingest_images_per_s} | {m.ingest_mb_per_s}"
            f" | {m.studies_per_min} | {shown(m.per_instance)} | {shown(m.per_job)}"
            f" | {shown(m.idle_per_s)} |"
        )
    print("(statements, round trips) sent to PostgreSQL")


if __name__ == "__main__":
    main()
