"""Triton elsewhere: `serve` with ``triton.mode: remote`` and two endpoints, each a
tritonserver of its own started here (from the nvidia-pytriton wheel, standing in for
NVIDIA's Triton container on a GPU host). Jobs go to both; one endpoint SIGKILLed
while a job runs on it fails that job over to the other, and every study still gets
its results in Orthanc exactly once."""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

from infergate.inference.embedded import EmbeddedTriton
from infergate.testing import LEFT_FRONTAL, RIGHT_PARIETAL, HeadPhantom, write_head_ct
from peers import (
    REPO,
    InfergateProcess,
    Orthanc,
    infergate_config,
    require_program,
    storescu,
    triton_settings,
    wait_until,
)

MODEL = "ct_head_bleed"


@pytest.fixture
def two_tritons(tmp_path: Path) -> Iterator[list[EmbeddedTriton]]:
    servers = []
    try:
        for name in ("a", "b"):
            server = EmbeddedTriton(
                triton_settings(REPO / "model_repository"),
                tmp_path / f"triton-{name}",
                models=(MODEL,),
            )
            server.launch()
            servers.append(server)
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def _served(url: str) -> int:
    """How many inference requests the tritonserver at ``url`` answered."""
    client = grpcclient.InferenceServerClient(url)
    try:
        stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"]
    finally:
        client.close()
    return sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)


def _head(folder: Path) -> HeadPhantom:
    return write_head_ct(folder, (RIGHT_PARIETAL, LEFT_FRONTAL))


def test_jobs_spread_over_two_tritons_and_fail_over_when_one_is_killed(
    tmp_path: Path, two_tritons: list[EmbeddedTriton]
) -> None:
    require_program("storescu")
    first, second = (t.url for t in two_tritons)
    orthanc = Orthanc(tmp_path / "orthanc")
    orthanc.start()
    config = infergate_config(tmp_path / "var", orthanc)
    config["plugins"] = {"enabled": ["ct_head_bleed"]}
    config["triton"] = {
        "mode": "remote",
        "urls": [first, second],
        "health_interval_s": 0.5,
        "retry_delay_s": 0.5,
        "model_repository": str(REPO / "model_repository"),
    }
    server = InfergateProcess(tmp_path / "ig", config)
    server.workdir.mkdir(parents=True)
    studies = []
    try:
        server.start()
        ready = server.wait_event("serve.ready", 5)[0]
        assert ready["triton"] == [first, second]
        # Four studies, one after another: the jobs take the two endpoints in turn.
        for number in range(4):
            head = _head(tmp_path / f"head-{number}")
            studies.append(head.study_uid)
            storescu(server.port, list(head.paths))
            wait_until(lambda s=head.study_uid: orthanc.find_instances(s, "SR"), 120, "the SR")
        assert _served(first) == 2
        assert _served(second) == 2

        # The next job goes to the first endpoint; it is killed as that job starts.
        head = _head(tmp_path / "head-killed")
        studies.append(head.study_uid)
        storescu(server.port, list(head.paths))
        started = server.wait_event("inference.job.started", 60, count=5)[4]
        assert started["triton"] == first
        killed = two_tritons[0].pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: orthanc.find_instances(head.study_uid, "SR"), 120, "the SR")
        retried = server.wait_event("inference.job.retrying", 5)
        assert [e["job_id"] for e in retried] == [started["job_id"]]
        attempts = [e for e in server.events() if e["event"] == "inference.job.started"]
        assert attempts[-1]["job_id"] == started["job_id"]
        assert attempts[-1]["triton"] == second
        assert any(
            e["event"] == "triton.endpoint.down" and e["url"] == first for e in server.events()
        )

        # From then on the jobs go to the one left.
        head = _head(tmp_path / "head-after")
        studies.append(head.study_uid)
        storescu(server.port, list(head.paths))
        wait_until(lambda: orthanc.find_instances(head.study_uid, "SR"), 120, "the SR")
        assert _served(second) == 4
    finally:
        server.stop()
    try:
        # Each study's results exactly once: one SEG and one SR per study.
        for study in studies:
            kinds = Counter({m: len(orthanc.find_instances(study, m)) for m in ("SEG", "SR")})
            assert kinds == {"SEG": 1, "SR": 1}, study
    finally:
        orthanc.stop()
