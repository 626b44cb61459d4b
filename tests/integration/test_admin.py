"""Operators see and steer the running gateway: ``infergate jobs``, ``deliveries``,
``studies`` and ``selftest`` against a running ``serve``, and the admin API's token.

Real peers: ``infergate serve`` with its embedded tritonserver, storescu, Orthanc.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from infergate.testing import ChestPhantom
from peers import (
    PEER_ENV,
    REPO,
    InfergateProcess,
    Orthanc,
    assert_no_patient_data,
    headless_page,
    infergate_config,
    poisoned_copy,
    process_name,
    process_tree,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.integration

TOKEN = "test-token-0123456789abcdef"  # noqa: S105 - a test's own


def _cli(
    server: InfergateProcess, *arguments: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``infergate ARGUMENTS --config`` the running server's settings file."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "infergate.cli",
            *arguments,
            "--config",
            str(server.workdir / "infergate.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=PEER_ENV,
        cwd=server.workdir,
        check=False,
    )


def _json(server: InfergateProcess, *arguments: str) -> Any:
    done = _cli(server, *arguments, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _post(server: InfergateProcess, path: str, token: str | None) -> tuple[int, dict[str, Any]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(
        server.ops_url + path, data=b"{}", headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_a_failed_job_is_listed_with_its_reason_and_a_retry_needs_the_token(
    tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom
) -> None:
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_lung"]}
    config["ops"]["token"] = TOKEN
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        study_uid, paths = poisoned_copy(list(small_phantom.paths), tmp_path / "poisoned")
        storescu(server.port, paths)
        server.wait_event("inference.job.failed", timeout=120, fail_on=())
        storescu(server.port, list(small_phantom.paths))
        server.wait_event("export.delivered", timeout=120, fail_on=("export.dead_letter",))

        (failed,) = _json(server, "jobs", "--state", "failed")
        assert failed["study_uid"] == study_uid
        assert failed["plugin"] == "ct_lung"
        assert failed["error"].startswith("volume building failed: ValueError raised in")
        done = _json(server, "jobs", "--state", "done", "--since", "1h")
        assert [j["study_uid"] for j in done] == [small_phantom.study_uid]
        assert set(done[0]["timings_s"]) >= {"volume_s", "inference_s", "encode_s"}
        assert _json(server, "jobs", "--plugin", "no_such_plugin") == []

        shown = _cli(server, "jobs", "show", failed["job_id"])
        assert shown.returncode == 0, shown.stderr
        assert "reason: volume building failed: ValueError" in shown.stdout
        assert "route (series completed by" in shown.stdout
        assert "ct_lung runs: rule ct_lung (default) matched" in shown.stdout
        detail = _json(server, "jobs", "show", done[0]["job_id"])
        assert sorted(r["kind"] for r in detail["results"]) == ["seg", "sr"]
        assert {r["state"] for r in detail["results"]} == {"delivered"}
        (delivery,) = detail["deliveries"]
        assert delivery["state"] == "delivered"
        assert delivery["destination"].startswith(orthanc.ae_title)

        table = _cli(server, "jobs")
        assert table.returncode == 0
        assert failed["job_id"] in table.stdout
        assert "failed" in table.stdout
        studies = _json(server, "studies")
        by_uid = {s["study_uid"]: s for s in studies}
        assert by_uid[small_phantom.study_uid]["results"] == {"delivered": 2}
        assert by_uid[study_uid]["jobs"] == {"failed": 1}

        _page_shows_both_jobs(server, failed, done[0], small_phantom)
        _retry_needs_the_token(server, failed, done[0])

        answers = "".join(
            _cli(server, *command).stdout
            for command in (
                ("jobs", "--json"),
                ("jobs", "show", failed["job_id"], "--json"),
                ("jobs", "show", done[0]["job_id"]),
                ("deliveries", "--json"),
                ("studies",),
            )
        )
        assert_no_patient_data(answers, small_phantom.identity)
    finally:
        server.stop()


def _page_shows_both_jobs(
    server: InfergateProcess,
    failed: dict[str, Any],
    done: dict[str, Any],
    phantom: ChestPhantom,
) -> None:
    """The status page in a real browser: no console message, both jobs, the failed
    one with its reason, the chart; a screenshot is kept."""
    dom, console = headless_page(server.ops_url + "/", "status-page.png")
    assert console == []
    assert failed["job_id"] in dom
    assert done["job_id"] in dom
    assert "volume building failed: ValueError raised in" in dom
    assert 'id="chart"' in dom
    assert_no_patient_data(dom, phantom.identity)


def _retry_needs_the_token(
    server: InfergateProcess, failed: dict[str, Any], done: dict[str, Any]
) -> None:
    # A state change without the token, or with a wrong one, is refused.
    retry = f"/api/jobs/{failed['job_id']}/retry"
    assert _post(server, retry, None)[0] == 401
    assert _post(server, retry, "x" * len(TOKEN))[0] == 401
    assert _json(server, "jobs", "--state", "failed")[0]["attempts"] >= 1
    # With it (the CLI reads it from the same settings), the job runs again.
    retried = _cli(server, "jobs", "retry", failed["job_id"])
    assert retried.returncode == 0, retried.stderr
    server.wait_event("inference.job.failed", timeout=120, count=2, fail_on=())
    # A done job is not retried: its results are re-sent by a replay.
    again = _cli(server, "jobs", "retry", done["job_id"])
    assert again.returncode == 1
    assert "only a failed or dead job is retried" in again.stderr
    assert _cli(server, "jobs", "show", "no-such-job").returncode == 1


def test_a_dead_letter_replayed_to_a_destination_that_accepts_arrives_once(
    tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom
) -> None:
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_lung"]}
    config["ops"]["token"] = TOKEN
    # Orthanc checks the called AE title: the default destination is refused for good.
    config["export"]["destination"]["ae_title"] = "NOT_ORTHANC"
    # The destination the operator replays to: configured (for another called AE title).
    right = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
    config["ingest"]["called_aes"] = [{"ae_title": "RESEARCH", "destination": right}]
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(small_phantom.paths))
        server.wait_event("export.dead_letter", timeout=120, fail_on=())
        (dead,) = _json(server, "deliveries", "--dead")
        assert dead["destination"].startswith("NOT_ORTHANC")
        assert "Rejected Permanent" in dead["reason"]
        assert sorted(o["kind"] for o in dead["objects"]) == ["seg", "sr"]
        listed = _cli(server, "deliveries", "--dead")
        assert dead["delivery_id"] in listed.stdout

        wrong = _cli(server, "deliveries", "replay", dead["delivery_id"], "--to", "ELSEWHERE")
        assert wrong.returncode == 1
        assert "'ELSEWHERE' is not a configured destination" in wrong.stderr
        replayed = _cli(
            server, "deliveries", "replay", dead["delivery_id"], "--to", orthanc.ae_title
        )
        assert replayed.returncode == 0, replayed.stderr
        server.wait_event("export.delivered", timeout=120, fail_on=())
        # Replayed once: a second replay, of it or of every dead letter, sends nothing.
        twice = _cli(server, "deliveries", "replay", dead["delivery_id"], "--to", orthanc.ae_title)
        assert twice.returncode == 1
        assert "replayed already" in twice.stderr
        none_left = _cli(server, "deliveries", "replay", "--all-dead")
        assert none_left.returncode == 0, none_left.stderr
        assert "no dead letters to replay" in none_left.stdout
        assert _json(server, "deliveries", "--dead") == []
        assert len(orthanc.find_instances(small_phantom.study_uid, "SEG")) == 1
        assert len(orthanc.find_instances(small_phantom.study_uid, "SR")) == 1
        _, metrics = server.http("/metrics")
        assert 'infergate_dead_letters{kind="delivery"} 0.0' in metrics
        assert_no_patient_data(json.dumps(_json(server, "deliveries")), small_phantom.identity)
    finally:
        server.stop()
    replays = [e for e in server.events() if e["event"] == "ops.delivery.replayed"]
    assert len(replays) == 1


def test_selftest_passes_on_the_embedded_defaults_and_names_a_missing_model(
    tmp_path: Path, orthanc: Orthanc
) -> None:
    repository = tmp_path / "models"
    shutil.copytree(REPO / "model_repository", repository)
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["triton"]["model_repository"] = str(repository)
    config["ops"]["token"] = TOKEN
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        passed = _cli(server, "selftest", "--destination", orthanc.ae_title, timeout=600)
        assert passed.returncode == 0, passed.stdout + passed.stderr
        lines = passed.stdout.splitlines()
        assert lines[0].startswith("selftest: gateway ready")
        for plugin in ("ct_lung", "ct_head_bleed", "cxr_quality"):
            assert any(line.startswith(f"selftest: {plugin} done") for line in lines), lines
        assert any(line.startswith("selftest: delivered") for line in lines)
        assert lines[-1].startswith("selftest: passed")
        # Only what the selftest was told to deliver reached the PACS.
        assert len(orthanc.get("/studies")) == 3

        # The model of ct_lung gone from the repository Triton (re)starts from.
        shutil.move(repository / "ct_lung_seg", tmp_path / "ct_lung_seg.moved")
        assert server.process is not None
        (triton,) = [
            pid for pid in process_tree(server.process.pid) if process_name(pid) == "tritonserver"
        ]
        os.kill(triton, signal.SIGKILL)
        wait_until(lambda: server.http("/readyz")[0] == 503, 30, "readyz 503")
        wait_until(
            lambda: "the model is not loaded" in server.http("/readyz")[1], 120, "Triton back"
        )
        failed = _cli(server, "selftest", timeout=300)
        assert failed.returncode == 1
        assert (
            "selftest: FAILED: the gateway is not ready"
            " (model ct_lung_seg (plugin ct_lung): the model is not loaded)"
        ) in failed.stdout, failed.stdout
    finally:
        server.stop()
