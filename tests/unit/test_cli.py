from __future__ import annotations

from datetime import datetime
from pathlib import Path

import pytest

from infergate.cli import main
from infergate.config import Settings, load_settings
from infergate.errors import OpsClientError
from infergate.ops.client import OpsClient
from infergate.ops.commands import since_time
from peers import free_port


def test_plugins_lists_name_version_model_and_tensors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "ct_lung 1.0.0" in out
    assert "Triton model: ct_lung_seg" in out
    assert "CT_HU INT16 [-1, -1, -1]" in out
    assert "1=Right lung, 2=Left lung" in out


def test_unknown_config_key_stops_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("export:\n  destinaton: {}\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'export.destinaton'" in err
    assert str(path) in err


def test_since_takes_a_span_back_from_now_or_a_local_time() -> None:
    now = 1_800_000_000.0
    assert since_time("90m", now) == now - 5400
    assert since_time("2h", now) == now - 7200
    assert since_time("1.5d", now) == now - 129600
    at = datetime(2026, 12, 1, 8, 0)
    assert since_time("2026-12-01T08:00", now) == at.timestamp()
    with pytest.raises(OpsClientError, match="give a span"):
        since_time("yesterday", now)


def test_an_admin_command_without_a_gateway_says_where_it_looked(tmp_path: Path) -> None:
    config = tmp_path / "ig.yaml"
    config.write_text(f"ops: {{port: {free_port()}}}\n")
    looked = r"no answer from the gateway's ops endpoint at http://127\.0\.0\.1:\d+"
    with pytest.raises(OpsClientError, match=looked):
        OpsClient(load_settings(config).ops).get("/api/jobs")
    settings = Settings.model_validate({"ops": {"enabled": False}})
    with pytest.raises(OpsClientError, match=r"ops\.enabled: false"):
        OpsClient(settings.ops)
