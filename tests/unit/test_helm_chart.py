"""The Helm chart (deploy/helm/infergate), checked without a cluster: `helm lint
--strict` passes, every manifest it renders (default values, with DICOM TLS, and three
nodes on PostgreSQL with a shared spool) validates strictly against the Kubernetes API
schemas of the oldest and newest versions it supports (kubernetes-validate), and the
manifests agree with Infergate: the settings in the ConfigMap load, the ports, probes,
mounts and the state are the ones those settings use, Triton's Service is where they
point, and Triton loads the models the plugins call. Nothing here installs the chart
(README: "Kubernetes")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from infergate.config import Settings, load_settings
from infergate.plugins import discover
from peers import REPO

CHART = REPO / "deploy" / "helm" / "infergate"
# The chart's kubeVersion floor, and the newest schemas the validator ships.
KUBERNETES_VERSIONS = ("1.27.0", "1.37.0")
NODES = [
    "--set", "gateway.replicas=3",
    "--set", "database.url=postgresql://infergate@db.example.org:5432/infergate",
    "--set", "secrets.database=infergate-db",
    "--set", "gateway.persistence.sharedClaim=infergate-spool",
]  # fmt: skip
VALUES = {"default": [], "tls": ["--set", "secrets.tls=infergate-tls"], "nodes": NODES}


def _helm(*arguments: str, fails: bool = False) -> str:
    done = subprocess.run(
        [str(Path(sys.executable).parent / "helm"), *arguments],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode != 0) is fails, done.stdout + done.stderr
    return done.stdout + done.stderr


def _rendered(values: list[str]) -> list[dict[str, Any]]:
    text = _helm("template", "site", str(CHART), *values)
    return [doc for doc in yaml.safe_load_all(text) if doc]


def _one(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def test_the_chart_lints() -> None:
    _helm("lint", "--strict", str(CHART))


def test_several_nodes_without_postgresql_or_a_shared_spool_are_refused() -> None:
    told = _helm("template", "site", str(CHART), "--set", "gateway.replicas=2", fails=True)
    assert "needs database.url" in told
    url = "database.url=postgresql://infergate@db:5432/infergate"
    told = _helm(
        "template", "site", str(CHART), "--set", "gateway.replicas=2", "--set", url, fails=True
    )
    assert "needs gateway.persistence.sharedClaim" in told


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("values", list(VALUES), ids=list(VALUES))
def test_every_manifest_validates_against_the_kubernetes_schemas(values: str, version: str) -> None:
    manifests = _rendered(VALUES[values])
    kinds = sorted(m["kind"] for m in manifests)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "PodDisruptionBudget",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "Service",
            "StatefulSet",
        ]
    )
    for manifest in manifests:
        kubernetes_validate.validate(manifest, version, strict=True)


def _assert_state(
    values: str, gateway: dict[str, Any], env: dict[str, Any], settings: Settings
) -> None:
    """Several nodes: PostgreSQL with its password from a secret and the shared claim;
    one: SQLite on the pod's own volume."""
    if values == "nodes":
        assert gateway["spec"]["replicas"] == 3
        assert str(settings.storage.database).startswith("postgresql://")
        assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "infergate-db",
            "key": "password",
        }
        volumes = {v["name"]: v for v in gateway["spec"]["template"]["spec"]["volumes"]}
        assert volumes["var"]["persistentVolumeClaim"]["claimName"] == "infergate-spool"
        assert "volumeClaimTemplates" not in gateway["spec"]
    else:
        assert gateway["spec"]["replicas"] == 1
        assert settings.storage.database == settings.storage.var_dir / "infergate.db"
        assert "PGPASSWORD" not in env
        (claim,) = gateway["spec"]["volumeClaimTemplates"]
        assert claim["metadata"]["name"] == "var"


@pytest.mark.parametrize("values", list(VALUES), ids=list(VALUES))
def test_the_manifests_agree_with_the_settings_they_carry(values: str, tmp_path: Path) -> None:
    manifests = _rendered(VALUES[values])
    config = _one(manifests, "ConfigMap", "site-infergate")["data"]["infergate.yaml"]
    (tmp_path / "infergate.yaml").write_text(config)
    settings = load_settings(tmp_path / "infergate.yaml")

    gateway = _one(manifests, "StatefulSet", "site-infergate")
    pod = gateway["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["dicom"] == settings.ingest.port
    assert ports["ops"] == settings.ops.port
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "ops"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["var"] == str(settings.storage.var_dir)
    assert container["args"] == ["serve", "--config", "/etc/infergate/infergate.yaml"]
    assert mounts["config"] == "/etc/infergate/infergate.yaml"
    env = {e["name"]: e for e in container["env"]}
    assert "secretKeyRef" in env["INFERGATE_OPS__TOKEN"]["valueFrom"]
    # Each pod is a node of its own name.
    assert env["INFERGATE_NODE__NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    _assert_state(values, gateway, env, settings)

    dicom = _one(manifests, "Service", "site-infergate-dicom")
    assert dicom["spec"]["type"] == "LoadBalancer"
    assert dicom["spec"]["externalTrafficPolicy"] == "Local"  # peers known by address
    service_ports = {p["name"]: p for p in dicom["spec"]["ports"]}
    assert service_ports["dicom"]["port"] == settings.ingest.port
    tls = settings.ingest.tls
    if values == "tls":
        assert tls is not None
        assert service_ports["dicom-tls"]["port"] == ports["dicom-tls"] == tls.port
        assert Path(tls.certificate).parent == Path(mounts["tls"])
    else:
        assert tls is None
        assert "dicom-tls" not in service_ports

    # Triton: where the settings point, on a GPU, ready when its models are.
    host, port = settings.triton.grpc_url.rsplit(":", 1)
    assert settings.triton.mode == "remote"
    triton_service = _one(manifests, "Service", host)
    assert {p["name"]: p["port"] for p in triton_service["spec"]["ports"]}["grpc"] == int(port)
    triton = _one(manifests, "Deployment", host)["spec"]["template"]["spec"]
    (server,) = triton["containers"]
    assert server["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    loaded = {a.split("=", 1)[1] for a in server["args"] if a.startswith("--load-model=")}
    assert loaded == {p.spec.model_name for p in discover()}
    assert "--model-control-mode=explicit" in server["args"]
