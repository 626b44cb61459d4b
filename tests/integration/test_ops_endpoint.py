"""The ops endpoint of a running ``serve``: probes that follow reality, and metrics of
a study that went through, with no patient data in any answer.

Real peers: ``infergate serve`` with its embedded tritonserver, storescu, Orthanc.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from infergate import __version__
from infergate.testing import ChestPhantom
from peers import (
    PEER_ENV,
    InfergateProcess,
    Orthanc,
    assert_no_patient_data,
    free_port,
    infergate_config,
    json_events,
    process_name,
    process_tree,
    run_cli,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.integration


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _failing(body: str) -> set[str]:
    return {c["check"] for c in json.loads(body)["checks"] if not c["ok"]}


def _ingest_counted(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], instances: int, var_dir: Path
) -> None:
    """Ingest's metrics, counted in the listener processes: one study in one
    association, and one association rejected."""
    assert samples[("infergate_instances_received_total", ())] == instances
    # The bytes as spooled (the file meta as Infergate writes it), as the store has them.
    uri = f"file:{var_dir / 'infergate.db'}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        (spooled,) = db.execute("SELECT SUM(size) FROM instances").fetchone()
    assert samples[("infergate_received_bytes_total", ())] == spooled
    associations = "infergate_associations_total"
    assert samples[(associations, (("outcome", "accepted"), ("reason", "")))] == 1
    assert samples[(associations, (("outcome", "released"), ("reason", "")))] == 1
    rejected = (("outcome", "rejected"), ("reason", "Called AE title not recognised"))
    assert samples[(associations, rejected)] == 1
    assert samples[("infergate_store_commit_seconds_count", ())] >= 1
    assert samples[("infergate_series_completed_total", (("trigger", "quiet"),))] == 1


def _probes_pass(server: InfergateProcess) -> None:
    """Live and ready, each check of each probe named."""
    status, body = server.http("/healthz")
    assert status == 200, body
    checks = {c["check"] for c in json.loads(body)["checks"]}
    assert {"stage inference", "stage export", "listener processes"} <= checks
    status, body = server.http("/readyz")
    assert status == 200, body
    assert {c["check"] for c in json.loads(body)["checks"]} >= {
        "listener processes",
        "state store",
        "free space",
        "triton",
        "model ct_lung_seg (plugin ct_lung)",
    }


def _names_its_node(
    server: InfergateProcess,
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    node: str,
) -> None:
    """The node's name on its metrics, on every line of every process (gateway,
    listeners, the job's) and on the job it ran."""
    assert samples[("infergate_node_info", (("node", node), ("version", __version__)))] == 1
    assert {e.get("node") for e in server.events()} == {node}
    (job,) = json.loads(server.http("/api/jobs")[1])
    assert job["node"] == node


def test_probes_and_metrics_of_a_running_gateway(
    tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom
) -> None:
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_lung"]}
    config["triton"].update({"retry_delay_s": 1.0, "unavailable_attempts": 10})
    config["node"] = {"name": "ig-test-node-1"}
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        _probes_pass(server)

        storescu(server.port, list(small_phantom.paths))
        server.wait_event("export.delivered", timeout=120, fail_on=("export.dead_letter",))
        # An association to a called AE title the gateway does not have: rejected.
        echo = subprocess.run(
            ["echoscu", "-aec", "NOT_OURS", "127.0.0.1", str(server.port)],
            capture_output=True,
            env=PEER_ENV,
            timeout=30,
            check=False,
        )
        assert echo.returncode != 0
        status, text = server.http("/metrics")
        assert status == 200
        samples = _samples(text)
        assert (
            samples[("infergate_jobs_ended_total", (("plugin", "ct_lung"), ("state", "done")))] == 1
        )
        stages = {"volume", "preprocess", "inference", "postprocess", "encode", "write"}
        for stage in stages:
            key = ("infergate_job_stage_seconds_count", (("plugin", "ct_lung"), ("stage", stage)))
            assert samples[key] == 1, stage
        # The job's process measured its own peak: more than the volume it held.
        peak = samples[("infergate_job_peak_memory_bytes_sum", (("plugin", "ct_lung"),))]
        volume_bytes = sum(p.stat().st_size for p in small_phantom.paths)
        assert peak > volume_bytes
        _ingest_counted(samples, len(small_phantom.paths), tmp_path / "var")
        delivered = ("destination", orthanc.ae_title), ("outcome", "delivered")
        assert samples[("infergate_delivery_attempts_total", delivered)] == 1
        assert samples[("infergate_triton_up", ())] == 1
        _names_its_node(server, samples, "ig-test-node-1")
        assert samples[("infergate_oldest_undelivered_result_age_seconds", ())] == 0
        assert samples[("infergate_listener_processes", (("status", "up"),))] >= 1
        assert samples[("infergate_spool_free_bytes", ())] > 0
        queued = ("infergate_jobs_waiting", (("priority", "normal"), ("state", "queued")))
        assert samples[queued] == 0
        # Nothing of the patient's in any answer.
        answers = text + server.http("/healthz")[1] + server.http("/readyz")[1]
        assert_no_patient_data(answers, small_phantom.identity)
        assert small_phantom.study_uid not in answers  # UIDs are not labels

        # The embedded tritonserver killed: not ready within seconds, ready again once
        # the watchdog has started it again.
        assert server.process is not None
        (triton,) = [
            pid for pid in process_tree(server.process.pid) if process_name(pid) == "tritonserver"
        ]
        os.kill(triton, signal.SIGKILL)
        status, body = wait_until(
            lambda: (answer := server.http("/readyz"))[0] == 503 and answer, 15, "readyz 503"
        )
        assert {"triton", "model ct_lung_seg (plugin ct_lung)"} <= _failing(body)
        assert server.http("/healthz")[0] == 200  # the gateway itself is alive
        wait_until(lambda: server.http("/readyz")[0] == 200, 120, "readyz 200 again")
    finally:
        server.stop()


def test_the_ops_endpoint_can_be_turned_off(tmp_path: Path) -> None:
    config = infergate_config(tmp_path / "var", None)
    config["ops"]["enabled"] = False
    config["plugins"] = {"enabled": ["ct_lung"]}
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        with pytest.raises(OSError, match="refused"):
            server.http("/healthz")
    finally:
        server.stop()
    assert not [e for e in server.events() if e["event"] == "ops.listening"]


def test_check_echoes_every_destination_and_fails_for_one_that_does_not_answer(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    config = infergate_config(tmp_path / "var", orthanc)
    config["plugins"] = {"enabled": ["ct_lung"]}
    closed = free_port()  # nothing listens there
    config["routing"] = {
        "unmatched": {"destination": {"ae_title": "ARCHIVE", "host": "127.0.0.1", "port": closed}}
    }
    path = tmp_path / "ig.yaml"
    path.write_text(yaml.safe_dump(config))
    checked = run_cli("check", "--config", str(path), cwd=tmp_path)
    assert checked.returncode == 1, checked.stdout[-3000:]
    events = json_events(checked.stdout)
    answered = [e for e in events if e["event"] == "check.destination.answered"]
    unreachable = [e for e in events if e["event"] == "check.destination.unreachable"]
    assert [e["destination"] for e in answered] == [orthanc.ae_title]
    assert [e["destination"] for e in unreachable] == ["ARCHIVE"]
    assert "refused" in unreachable[0]["reason"].lower()
