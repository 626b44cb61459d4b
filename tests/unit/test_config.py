from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from infergate.config import Settings, load_settings
from infergate.errors import ConfigError
from peers import REPO


def test_defaults_are_the_embedded_ones() -> None:
    settings = load_settings(None)
    assert settings.ingest.ae_title == "INFERGATE"
    assert settings.ingest.port == 11112
    assert settings.triton.mode == "embedded"
    # Relative paths are resolved against the working directory at start.
    assert settings.triton.model_repository == Path.cwd() / "model_repository"
    assert settings.storage.database == Path.cwd() / "var" / "infergate.db"
    assert settings.storage.spool_dir == Path.cwd() / "var" / "spool"
    assert settings.export.destination is None


def test_yaml_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "ig.yaml"
    path.write_text("ingest:\n  port: 4100\nassembly:\n  quiet_period_s: 2.5\n")
    settings = load_settings(path)
    assert settings.ingest.port == 4100
    assert settings.assembly.quiet_period_s == 2.5


def test_unknown_key_names_the_key_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ig.yaml"
    path.write_text("ingest:\n  prot: 4100\n")
    with pytest.raises(ConfigError, match=r"unknown key 'ingest\.prot' in .*ig\.yaml"):
        load_settings(path)


def test_unknown_section_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "ig.yaml"
    path.write_text("ingets: {}\n")
    with pytest.raises(ConfigError, match="unknown key 'ingets'"):
        load_settings(path)


def test_invalid_value_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ig.yaml"
    path.write_text("ingest:\n  port: 70000\n")
    with pytest.raises(ConfigError, match=r"'ingest\.port'"):
        load_settings(path)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ig.yaml"
    path.write_text("ingest:\n  port: 4100\n  ae_title: FROMFILE\n")
    monkeypatch.setenv("INFERGATE_INGEST__PORT", "4200")
    settings = load_settings(path)
    assert settings.ingest.port == 4200
    assert settings.ingest.ae_title == "FROMFILE"


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(ValidationError):
        settings.ingest.port = 1


def test_broken_yaml_and_missing_file_are_config_errors(tmp_path: Path) -> None:
    path = tmp_path / "ig.yaml"
    path.write_text("ingest: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(tmp_path / "absent.yaml")


def test_the_example_config_loads() -> None:
    settings = load_settings(REPO / "deploy" / "infergate.example.yaml")
    assert settings.export.destination is not None
    assert settings.export.destination.ae_title == "ORTHANC"


def test_the_node_is_named_after_the_host_unless_told() -> None:
    assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", Settings().node.name)
    assert Settings.model_validate({"node": {"name": "ig-site-b-2"}}).node.name == "ig-site-b-2"
    with pytest.raises(ValidationError, match=r"node\.name"):
        Settings.model_validate({"node": {"name": "a name with spaces"}})
