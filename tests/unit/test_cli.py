from __future__ import annotations

from pathlib import Path

import pytest

from infergate.cli import main


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
