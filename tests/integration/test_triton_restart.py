"""A tritonserver that dies under `infergate serve` is started again, and a job that
found it gone waits, is retried, and its results arrive."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from infergate.testing import ChestPhantom
from peers import InfergateProcess, Orthanc, infergate_config, process_tree, storescu, wait_until

pytestmark = pytest.mark.integration


def _tritonserver(server: InfergateProcess) -> int:
    assert server.process is not None
    for pid in process_tree(server.process.pid):
        if Path(f"/proc/{pid}/comm").read_text().strip() == "tritonserver":
            return pid
    raise AssertionError("no tritonserver under infergate serve")


def test_a_killed_tritonserver_is_restarted_and_no_job_is_lost(
    tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom
) -> None:
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_lung"]}
    config["triton"].update({"retry_delay_s": 1.0, "unavailable_attempts": 10})
    server = InfergateProcess(tmp_path / "ig", config)
    server.workdir.mkdir()
    try:
        server.start()
        first = _tritonserver(server)
        os.kill(first, signal.SIGKILL)
        # Sent at once: the series completes while Triton is down or starting.
        storescu(server.port, list(small_phantom.paths))
        (died,) = server.wait_event("triton.embedded.died", timeout=30)
        assert died["returncode"] == -signal.SIGKILL
        (restarted,) = server.wait_event("triton.embedded.restarted", timeout=120)
        assert restarted["restarts"] == 1
        (sent,) = server.wait_event("export.sent", timeout=180)
        assert sent["kinds"] == ["seg", "sr"]
        assert _tritonserver(server) != first
        wait_until(
            lambda: orthanc.find_instances(small_phantom.study_uid, "SR"), 30, "the SR in Orthanc"
        )
        failed = [e for e in server.events() if e["event"] == "inference.job.failed"]
        assert failed == []
    finally:
        server.stop()
