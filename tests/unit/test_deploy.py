"""The container files, checked without a container runtime here: both Dockerfiles
pass hadolint, the compose file validates against the Compose Specification's schema,
its Prometheus configuration passes promtool, and what they say agrees with
Infergate: the image's settings and the compose environment load as settings, the
ports the images expose are the ones those settings listen on, and the models the
Triton image loads are the ones the plugins call. Nothing here builds or runs an
image (README: "Containers")."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from psycopg.conninfo import conninfo_to_dict

from infergate.config import Settings, load_settings
from infergate.plugins import discover
from peers import REPO, require_program

DEPLOY = REPO / "deploy"
IMAGE = DEPLOY / "docker" / "Dockerfile"
TRITON_IMAGE = DEPLOY / "triton" / "Dockerfile"
IMAGE_SETTINGS = DEPLOY / "docker" / "infergate.yaml"
COMPOSE = DEPLOY / "compose.yaml"


def _tool(name: str) -> str:
    """A checker installed with the test tools (in this environment's bin folder)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else require_program(name)


def _passes(*command: str) -> None:
    """``command`` exits 0; what it printed is the failure's message otherwise."""
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(instruction, arguments) of ``dockerfile``, continuation lines joined."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    found = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def _compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


@pytest.mark.parametrize("dockerfile", [IMAGE, TRITON_IMAGE], ids=["infergate", "triton"])
def test_the_dockerfiles_pass_hadolint(dockerfile: Path) -> None:
    _passes(_tool("hadolint"), "--failure-threshold", "info", str(dockerfile))


def test_the_image_is_multi_stage_pinned_and_not_root() -> None:
    instructions = _instructions(IMAGE)
    bases = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert len(bases) == 2
    assert all(re.fullmatch(r"python:\d+\.\d+\.\d+-slim-bookworm", b) for b in bases)
    users = [args for word, args in instructions if word == "USER"]
    assert users
    assert not users[-1].startswith(("0", "root"))
    # Every package at the version the suite ran with.
    (install,) = [a for w, a in instructions if w == "RUN" and "pip install" in a]
    assert "--constraint deploy/docker/constraints.txt" in install
    constraints = (DEPLOY / "docker" / "constraints.txt").read_text().splitlines()
    pinned = {line.split("==")[0].lower() for line in constraints if "==" in line}
    assert {"pydicom", "pynetdicom", "highdicom", "nvidia-pytriton", "numpy"} <= pinned


def test_the_image_settings_load_and_its_ports_are_the_ones_exposed() -> None:
    settings = load_settings(IMAGE_SETTINGS)
    assert settings.storage.var_dir == Path("/var/lib/infergate")
    assert settings.ops.host == "0.0.0.0"  # noqa: S104 - probes come from outside the container
    instructions = _instructions(IMAGE)
    exposed = {int(p) for w, a in instructions if w == "EXPOSE" for p in a.split()}
    assert {settings.ingest.port, settings.ops.port} <= exposed
    (volume,) = [a for w, a in instructions if w == "VOLUME"]
    assert str(settings.storage.var_dir) in volume
    (health,) = [a for w, a in instructions if w == "HEALTHCHECK"]
    assert f"127.0.0.1:{settings.ops.port}/healthz" in health
    copied = {a.split()[-1] for w, a in instructions if w == "COPY"}
    assert f"{settings.triton.model_repository}/" in copied


def test_the_compose_file_validates_against_the_compose_specification() -> None:
    _passes(_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE))


def test_the_gateway_in_compose_gets_settings_that_load_and_reach_its_peers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    gateway = services["infergate"]
    for key, value in gateway["environment"].items():
        # ${VAR:?message} is the operator's to give; any long enough token stands for it.
        monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "x" * 24, str(value)))
    settings = load_settings(IMAGE_SETTINGS)
    assert settings.triton.mode == "remote"
    host, port = settings.triton.grpc_url.rsplit(":", 1)
    assert host in services
    assert port == "8001"
    assert not settings.triton.use_shared_memory  # another container: over gRPC
    destination = settings.export.destination
    assert destination is not None
    assert destination.host in services
    pacs = services[destination.host]["environment"]
    assert destination.ae_title == pacs["ORTHANC__DICOM_AET"]
    assert str(destination.port) == pacs["ORTHANC__DICOM_PORT"]
    # Orthanc knows the gateway by its own AE title and port.
    (known,) = yaml.safe_load(pacs["ORTHANC__DICOM_MODALITIES"]).values()
    assert known == [settings.ingest.ae_title, "infergate", settings.ingest.port]
    # The peers admitted are this compose network.
    (subnet,) = [c["subnet"] for c in _compose()["networks"]["default"]["ipam"]["config"]]
    assert any(subnet in [str(a) for a in p.addresses] for p in settings.ingest.peers)
    published = {str(p).rsplit(":", 2)[-1] for p in gateway["ports"]}
    assert {str(settings.ingest.port), str(settings.ops.port)} <= published
    assert gateway["volumes"] == [f"infergate-var:{settings.storage.var_dir}"]


def test_the_compose_gateways_share_the_postgresql_state_and_the_spool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    services = _compose()["services"]
    database = services["postgres"]
    names, published = set(), set()
    for service in ("infergate", "infergate-2"):
        gateway = services[service]
        for key, value in gateway["environment"].items():
            monkeypatch.setenv(key, re.sub(r"\$\{[^}]*\}", "x" * 24, str(value)))
        settings = load_settings(IMAGE_SETTINGS)
        parts = conninfo_to_dict(str(settings.storage.database))
        assert parts["host"] in services
        assert parts["host"] == "postgres"
        assert parts["user"] == database["environment"]["POSTGRES_USER"]
        assert parts["dbname"] == database["environment"]["POSTGRES_DB"]
        assert "password" not in parts  # libpq takes it from PGPASSWORD
        assert gateway["environment"]["PGPASSWORD"] == database["environment"]["POSTGRES_PASSWORD"]
        assert gateway["depends_on"]["postgres"] == {"condition": "service_healthy"}
        assert gateway["volumes"] == [f"infergate-var:{settings.storage.var_dir}"]
        names.add(settings.node.name)
        published |= {str(p).rsplit(":", 1)[0] for p in gateway["ports"]}
    assert len(names) == 2  # a node name each
    assert len(published) == 4  # and host ports of its own
    assert services["infergate-2"]["profiles"] == ["two-nodes"]


def test_the_triton_image_loads_the_models_the_plugins_call() -> None:
    (command,) = [a for w, a in _instructions(TRITON_IMAGE) if w == "CMD"]
    arguments = yaml.safe_load(command)
    loaded = {a.split("=", 1)[1] for a in arguments if a.startswith("--load-model=")}
    called = {p.spec.model_name for p in discover()}
    assert loaded == called
    assert all((REPO / "model_repository" / name / "config.pbtxt").exists() for name in loaded)
    assert "--model-control-mode=explicit" in arguments
    services = _compose()["services"]
    assert services["triton"]["build"]["dockerfile"] == "deploy/triton/Dockerfile"
    (device,) = services["triton"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    probe = " ".join(shlex.quote(part) for part in services["triton"]["healthcheck"]["test"])
    assert "/v2/health/ready" in probe


def test_the_compose_prometheus_configuration_passes_promtool() -> None:
    mounts = _compose()["services"]["prometheus"]["volumes"]
    config = next(m for m in mounts if m.endswith(":/etc/prometheus/prometheus.yml:ro"))
    path = DEPLOY / config.split(":")[0]
    _passes(require_program("promtool"), "check", "config", str(path))
    targets = {
        t
        for job in yaml.safe_load(path.read_text())["scrape_configs"]
        for c in job["static_configs"]
        for t in c["targets"]
    }
    assert targets == {"infergate:9111", "triton:8002"}


def test_settings_from_the_environment_are_what_compose_relies_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The compose file nests keys with "__" and gives lists as JSON: the settings read both.
    monkeypatch.setenv(
        "INFERGATE_INGEST__PEERS", '[{"ae_title": "PACS", "addresses": ["10.1.5.0/24"]}]'
    )
    monkeypatch.setenv("INFERGATE_TRITON__URLS", '["gpu-1:8001", "gpu-2:8001"]')
    settings = Settings()
    assert [p.ae_title for p in settings.ingest.peers] == ["PACS"]
    assert settings.triton.urls == ("gpu-1:8001", "gpu-2:8001")
