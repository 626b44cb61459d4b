"""A DICOMweb destination (STOW-RS) through the same outbox: Orthanc with its DICOMweb
plugin (Debian's orthanc-dicomweb) and HTTP basic authentication, started by the test."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from infergate.testing import ChestPhantom
from peers import (
    InfergateProcess,
    Orthanc,
    assert_no_patient_data,
    infergate_config,
    run_cli,
    storescu,
)

pytestmark = pytest.mark.integration

_USER, _PASSWORD = "infergate", "stow-password-1"
_WRONG = "not-the-password"


def _web_destination(pacs: Orthanc, password: str = _PASSWORD) -> dict[str, str]:
    return {
        "ae_title": "WEBPACS",
        "stow_url": pacs.dicomweb_url,
        "username": _USER,
        "password": password,
    }


def test_results_reach_a_dicomweb_pacs_that_was_down_once_each(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    """Down at first (transient: connection refused), then up: the SEG and the SR
    arrive once each by STOW-RS, and ``infergate check`` reaches the service."""
    pacs = Orthanc(tmp_path / "web-pacs", dicomweb=True, users={_USER: _PASSWORD})
    config = infergate_config(tmp_path / "var", None, quiet_s=0.5)
    config["export"].update(
        {"destination": _web_destination(pacs), "retry_delay_s": 0.5, "max_retry_delay_s": 1}
    )
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(small_phantom.paths))
        (waiting,) = server.wait_event("export.retrying", timeout=120, fail_on=())
        assert waiting["destination"] == "WEBPACS"
        assert "did not answer" in waiting["reason"]
        pacs.start()
        server.wait_event("export.delivered", timeout=60, fail_on=("export.dead_letter",))
        path = server.workdir / "infergate.yaml"
        checked = run_cli("check", "--config", str(path), cwd=server.workdir)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert "check.destination.answered" in checked.stdout + checked.stderr
        # check used the running gateway's Triton, and left it running.
        assert "triton.embedded.shared" in checked.stdout + checked.stderr
        assert not [e for e in server.events() if e["event"] == "triton.embedded.died"]
        stored = {
            modality: pacs.find_instances(small_phantom.study_uid, modality)
            for modality in ("SEG", "SR")
        }
    finally:
        server.stop()
        pacs.stop()
    assert {modality: len(found) for modality, found in stored.items()} == {"SEG": 1, "SR": 1}
    (sent,) = [e for e in server.events() if e["event"] == "export.sent"]
    assert sent["destination"] == "WEBPACS"
    text = server.log_text()
    assert _PASSWORD not in text
    assert_no_patient_data(text, small_phantom.identity)


def test_a_dicomweb_pacs_that_refuses_our_credentials_is_a_dead_letter_at_once(
    tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    pacs = Orthanc(tmp_path / "web-pacs", dicomweb=True, users={_USER: _PASSWORD})
    pacs.start()
    config = infergate_config(tmp_path / "var", None, quiet_s=0.5)
    config["export"]["destination"] = _web_destination(pacs, password=_WRONG)
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(small_phantom.paths))
        (dead,) = server.wait_event("export.dead_letter", timeout=120, fail_on=())
        assert pacs.find_instances(small_phantom.study_uid, "SR") == []
    finally:
        server.stop()
        pacs.stop()
    assert "HTTP 401" in dead["reason"]
    assert not [e for e in server.events() if e["event"] == "export.retrying"]
    written = yaml.safe_load((server.workdir / "infergate.yaml").read_text())
    assert written["export"]["destination"]["stow_url"] == pacs.dicomweb_url
