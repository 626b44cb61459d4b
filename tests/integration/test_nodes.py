"""Several gateway nodes on this machine: two ``serve`` processes, each on its own DICOM
and ops port, sharing a PostgreSQL database (started by the tests) and one spool
folder, with one tritonserver of their own (standing in for Triton on a GPU host) and
Orthanc as the PACS.

A series whose halves go to different nodes is assembled whole and its results
arrive once; a series whose node is SIGKILLed before its quiet period ends is
completed by the other; a node SIGKILLed while it runs the job, or while it is in the
association that sends the results, has its work taken over by the other after the
lease, with the same result UIDs: every acknowledged instance in the store, each
result once in Orthanc."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgres import PostgresServer, start_postgres

from infergate.inference.embedded import EmbeddedTriton
from infergate.testing import LEFT_FRONTAL, RIGHT_PARIETAL, ChestPhantom, write_head_ct
from peers import (
    REPO,
    InfergateProcess,
    Orthanc,
    free_port,
    infergate_config,
    require_program,
    run_cli,
    storescu,
    triton_settings,
    wait_until,
)

pytestmark = pytest.mark.integration

LEASE_S = 4.0
TOKEN = "test-token-0123456789abcdef"  # noqa: S105 - a test's own
MODELS = ("ct_head_bleed", "ct_lung_seg")


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedTriton]:
    server = EmbeddedTriton(
        triton_settings(REPO / "model_repository"),
        tmp_path_factory.mktemp("triton"),
        models=MODELS,
    )
    try:
        server.launch()
        server.wait_ready()
        yield server
    finally:
        server.stop()


@dataclass
class Cluster:
    nodes: list[InfergateProcess]
    database: str
    orthanc: Orthanc

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """What a constant query reads from the nodes' database now."""
        with psycopg.connect(self.database, autocommit=True) as db:
            return db.execute(sql.encode()).fetchall()

    def node_named(self, name: str) -> InfergateProcess:
        (node,) = [n for n in self.nodes if n.config["node"]["name"] == name]
        return node

    def results_in_orthanc(self, study_uid: str) -> Counter[str]:
        return Counter({m: len(self.orthanc.find_instances(study_uid, m)) for m in ("SEG", "SR")})


def _cli(node: InfergateProcess, *arguments: str) -> subprocess.CompletedProcess[str]:
    """``infergate ARGUMENTS`` against the running ``node``'s settings."""
    return run_cli(
        *arguments, "--config", str(node.workdir / "infergate.yaml"), cwd=node.workdir, timeout=60
    )


def _cluster(
    tmp_path: Path, database: str, triton: EmbeddedTriton, orthanc: Orthanc, count: int = 2
) -> Cluster:
    nodes = []
    for index in range(count):
        config = infergate_config(tmp_path / "var", orthanc, quiet_s=2.0)  # one spool
        config["node"] = {"name": f"node-{index}"}
        config["storage"]["database_url"] = database
        config["ingest"]["processes"] = 1
        config["plugins"] = {"enabled": ["ct_head_bleed", "ct_lung"]}
        config["triton"] = {
            "mode": "remote",
            "urls": [triton.url],
            "model_repository": str(REPO / "model_repository"),
        }
        config["work"] = {"lease_s": LEASE_S}
        config["ops"] = {"port": free_port(), "token": TOKEN}
        node = InfergateProcess(tmp_path / f"node-{index}", config)
        node.workdir.mkdir(parents=True)
        nodes.append(node)
    return Cluster(nodes, database, orthanc)


@pytest.fixture
def cluster(tmp_path: Path, postgres: PostgresServer, triton: EmbeddedTriton) -> Iterator[Cluster]:
    require_program("storescu")
    orthanc = Orthanc(tmp_path / "orthanc")  # its ports chosen; each test starts it
    made = _cluster(tmp_path, postgres.new_database(), triton, orthanc)
    try:
        yield made
    finally:
        for node in made.nodes:
            node.stop()
        orthanc.stop()


def _start(cluster: Cluster) -> None:
    threads = [threading.Thread(target=node.start) for node in cluster.nodes]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for node in cluster.nodes:
        node.wait_event("serve.ready", 60)


def _head(folder: Path) -> tuple[str, list[Path]]:
    head = write_head_ct(folder, (RIGHT_PARIETAL, LEFT_FRONTAL))
    return head.study_uid, list(head.paths)


def _send_halves(cluster: Cluster, paths: list[Path]) -> None:
    """The even slices to the first node and the odd ones to the second, at once."""
    halves = [paths[0::2], paths[1::2]]
    senders = [
        threading.Thread(target=storescu, args=(node.port, half))
        for node, half in zip(cluster.nodes, halves, strict=True)
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()


def _acknowledged(cluster: Cluster, paths: list[Path]) -> None:
    """Every instance sent (storescu succeeded: each was acknowledged) has its row."""
    (count,) = cluster.rows("SELECT COUNT(*) FROM instances")[0]
    assert count == len(paths)


def test_a_series_sent_in_halves_to_two_nodes_gets_its_results_once(
    tmp_path: Path, cluster: Cluster
) -> None:
    cluster.orthanc.start()
    _start(cluster)
    study, paths = _head(tmp_path / "head")
    _send_halves(cluster, paths)
    wait_until(lambda: cluster.orthanc.find_instances(study, "SR"), 120, "the SR")
    _acknowledged(cluster, paths)
    # One series, one job, on all of its instances, whichever node ran it.
    jobs = cluster.rows("SELECT state, node FROM jobs")
    assert len(jobs) == 1
    assert jobs[0][0] == "done"
    ran = cluster.node_named(jobs[0][1])
    (started,) = [e for e in ran.events() if e["event"] == "inference.job.started"]
    (series,) = cluster.rows("SELECT instance_count, state FROM series")
    assert series == (len(paths), "complete")
    assert started["job_id"]
    status, body = ran.http("/api/nodes")
    assert status == 200
    assert {(n["node"], n["alive"]) for n in json.loads(body)} == {
        ("node-0", True),
        ("node-1", True),
    }
    for node in cluster.nodes:
        node.stop()
    assert cluster.rows("SELECT node FROM nodes") == []  # each left as it stopped
    assert cluster.results_in_orthanc(study) == {"SEG": 1, "SR": 1}
    every = [e for node in cluster.nodes for e in node.events()]
    assert not [e for e in every if e["level"] in ("error", "critical")]
    # Each node took its half: the associations were audited under each node's name.
    audited = cluster.rows("SELECT node, instances FROM associations ORDER BY node")
    assert audited == [("node-0", len(paths[0::2])), ("node-1", len(paths[1::2]))]


def test_a_node_killed_while_it_runs_the_job_has_it_finished_by_another(
    cluster: Cluster, chest_phantom: ChestPhantom
) -> None:
    """The 100-slice 512x512 chest: its lung job runs for seconds, time to kill its node."""
    cluster.orthanc.start()
    _start(cluster)
    study, paths = chest_phantom.study_uid, list(chest_phantom.paths)
    _send_halves(cluster, paths)

    def running() -> list[tuple[Any, ...]]:
        return cluster.rows("SELECT job_id, node FROM jobs WHERE state = 'running'")

    (job_id, holder) = wait_until(running, 60, "a running job")[0]
    killed = cluster.node_named(holder)
    killed.kill()
    assert running() == [(job_id, holder)], "the job ended before its node was killed"
    survivor = next(n for n in cluster.nodes if n is not killed)
    (taken,) = survivor.wait_event("work.node.taken_over", LEASE_S * 6)
    assert taken["nodes"] == [holder]
    assert taken["jobs_requeued"] == [job_id]
    seen = {n["node"]: n["alive"] for n in json.loads(survivor.http("/api/nodes")[1])}
    assert seen == {holder: False, survivor.config["node"]["name"]: True}
    # The operator says it is not coming back (a change: the ops token).
    forgot = _cli(survivor, "nodes", "forget", holder)
    assert forgot.returncode == 0, forgot.stderr
    left = [n["node"] for n in json.loads(survivor.http("/api/nodes")[1])]
    assert left == [survivor.config["node"]["name"]]
    wait_until(lambda: cluster.orthanc.find_instances(study, "SR"), 120, "the SR")
    survivor.stop()
    _acknowledged(cluster, paths)
    assert cluster.rows("SELECT state, node, interruptions FROM jobs") == [
        ("done", survivor.config["node"]["name"], 1)
    ]
    assert cluster.results_in_orthanc(study) == {"SEG": 1, "SR": 1}


def test_a_node_killed_in_the_association_that_sends_the_results_is_taken_over(
    tmp_path: Path, cluster: Cluster
) -> None:
    # Orthanc's port accepts connections and never answers: the association waits.
    silent = socket.socket()
    silent.bind(("127.0.0.1", cluster.orthanc.dicom_port))
    silent.listen(8)
    try:
        _start(cluster)
        study, paths = _head(tmp_path / "head")
        _send_halves(cluster, paths)

        def sending() -> list[tuple[Any, ...]]:
            return cluster.rows("SELECT delivery_id, node FROM deliveries WHERE state = 'sending'")

        (delivery_id, holder) = wait_until(sending, 120, "a delivery being sent")[0]
        killed = cluster.node_named(holder)
        killed.kill()
    finally:
        silent.close()
    cluster.orthanc.start()
    survivor = next(n for n in cluster.nodes if n is not killed)
    (taken,) = survivor.wait_event("work.node.taken_over", LEASE_S * 6)
    assert (taken["nodes"], taken["deliveries_due_again"]) == ([holder], 1)
    survivor.wait_event("export.delivered", 120, fail_on=("export.dead_letter",))
    survivor.stop()
    _acknowledged(cluster, paths)
    states = {
        row[0]: row[1:] for row in cluster.rows("SELECT delivery_id, state, node FROM deliveries")
    }
    assert states == {delivery_id: ("delivered", survivor.config["node"]["name"])}
    assert cluster.results_in_orthanc(study) == {"SEG": 1, "SR": 1}
    assert cluster.orthanc.get("/statistics")["CountInstances"] == 2


def test_a_series_completes_while_the_node_that_received_it_is_down(
    tmp_path: Path, cluster: Cluster
) -> None:
    cluster.orthanc.start()
    _start(cluster)
    study, paths = _head(tmp_path / "head")
    receiver, other = cluster.nodes
    storescu(receiver.port, paths)  # every instance to the first node, acknowledged
    receiver.kill()  # before its quiet period ends
    assert cluster.rows("SELECT state FROM series") == [("receiving",)]
    wait_until(lambda: cluster.orthanc.find_instances(study, "SR"), 120, "the SR")
    other.stop()
    _acknowledged(cluster, paths)
    assert cluster.rows("SELECT state, node FROM jobs") == [("done", "node-1")]
    (series,) = cluster.rows("SELECT instance_count, state FROM series")
    assert series == (len(paths), "complete")
    assert cluster.results_in_orthanc(study) == {"SEG": 1, "SR": 1}


def test_a_node_waits_out_a_postgresql_restart_and_goes_on(
    tmp_path: Path, triton: EmbeddedTriton
) -> None:
    """PostgreSQL stopped hard under a running node, for longer than a stage's 60
    failed rounds: the node is not ready and refuses associations meanwhile, does not
    exit, and takes and processes a study once the server is back."""
    database = start_postgres()
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.start()
    (node,) = _cluster(tmp_path, database.new_database(), triton, orthanc, count=1).nodes
    study, paths = _head(tmp_path / "head")
    try:
        node.start()
        database.stop()
        wait_until(lambda: node.http("/readyz")[0] == 503, 30, "readiness to see it")
        with pytest.raises(RuntimeError, match="storescu failed"):
            storescu(node.port, paths)  # nothing is acknowledged without the store
        time.sleep(15)  # 60 rounds of the 0.2 s poll and more
        assert node.process is not None
        assert node.process.poll() is None
        database.start_again()
        wait_until(lambda: node.http("/readyz")[0] == 200, 60, "ready again")
        storescu(node.port, paths)
        wait_until(lambda: orthanc.find_instances(study, "SR"), 120, "the SR")
    finally:
        node.stop()
        orthanc.stop()
        database.stop()
        shutil.rmtree(database.root, ignore_errors=True)
    events = [e["event"] for e in node.events()]
    assert "work.stage.waiting_for_store" in events
    assert "work.stage.store_back" in events
    assert "work.stage.failed" not in events
