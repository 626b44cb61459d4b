"""The ops team's side: deploy/prometheus's rules and config pass promtool, a real
Prometheus scrapes a running gateway while a study goes through and PromQL over its
HTTP API counts it, and every metric the rules and the Grafana dashboard use is one
the gateway serves.

Real peers: Debian's ``prometheus`` and ``promtool`` as plain processes on loopback
ports, ``infergate serve`` with its embedded tritonserver, storescu, Orthanc.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from infergate.testing import ChestPhantom
from peers import (
    PEER_ENV,
    REPO,
    InfergateProcess,
    Orthanc,
    free_port,
    infergate_config,
    require_program,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
DASHBOARD = REPO / "deploy" / "grafana" / "infergate-dashboard.json"


def _promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_program("promtool"), *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROMETHEUS_DIR,
        check=False,
    )


def test_the_rules_and_the_scrape_config_pass_promtool() -> None:
    rules = _promtool("check", "rules", "infergate-rules.yml")
    assert rules.returncode == 0, rules.stdout + rules.stderr
    assert "SUCCESS: 9 rules found" in rules.stdout
    config = _promtool("check", "config", "prometheus.yml")
    assert config.returncode == 0, config.stdout + config.stderr
    # The alerts fire when they should, and clear (promtool's own rule tests).
    tested = _promtool("test", "rules", "infergate-rules.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


class Prometheus:
    """A Prometheus of its own: config, storage and a loopback port in a folder."""

    def __init__(self, folder: Path, target: str, triton_target: str) -> None:
        self.port = free_port()
        folder.mkdir()
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
        config["rule_files"] = [str(PROMETHEUS_DIR / "infergate-rules.yml")]
        infergate, triton = config["scrape_configs"]
        infergate["static_configs"] = [{"targets": [target]}]
        triton["static_configs"] = [{"targets": [triton_target]}]
        (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                require_program("prometheus"),
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=(folder / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(self._ready, 60, "Prometheus to be ready")

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                return True
        except OSError:
            return False

    def api(self, path: str, **query: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(query)}"
        with urllib.request.urlopen(url, timeout=30) as answer:
            body = json.loads(answer.read())
        assert body["status"] == "success", body
        return body["data"]

    def value(self, promql: str) -> float | None:
        """The one value of an instant query, None when it has no result."""
        result = self.api("query", query=promql)["result"]
        return float(result[0]["value"][1]) if result else None

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.fixture
def gateway(tmp_path: Path, orthanc: Orthanc) -> Iterator[InfergateProcess]:
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_lung"]}
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


def _changes_are_refused_without_a_token(gateway: InfergateProcess) -> None:
    """This gateway's settings have no ops.token: every state change is refused (403),
    whatever token the request brings, and the log says why."""
    request = urllib.request.Request(
        gateway.ops_url + "/api/deliveries/replay-dead",
        data=b"{}",
        headers={"Authorization": "Bearer " + "t" * 24, "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=30)
    assert refused.value.code == 403
    assert "ops.token is not set" in json.loads(refused.value.read())["error"]
    (logged,) = [e for e in gateway.events() if e["event"] == "ops.change.refused"]
    assert logged["reason"] == "no ops.token set"


def _without_series_uid(source: Path, folder: Path) -> Path:
    """An instance ingest must refuse: it names no series."""
    ds = pydicom.dcmread(source)
    del ds.SeriesInstanceUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    folder.mkdir()
    ds.save_as(folder / "no-series.dcm")
    return folder / "no-series.dcm"


def test_prometheus_scrapes_a_study_through_the_gateway_and_promql_counts_it(
    tmp_path: Path, gateway: InfergateProcess, small_phantom: ChestPhantom
) -> None:
    prometheus = Prometheus(
        tmp_path / "prometheus",
        gateway.ops_url.removeprefix("http://"),
        f"127.0.0.1:{gateway.config['triton']['metrics_port']}",
    )
    try:
        wait_until(lambda: prometheus.value('up{job="infergate"}') == 1, 60, "a first scrape")
        storescu(gateway.port, list(small_phantom.paths))
        gateway.wait_event("export.delivered", timeout=120, fail_on=("export.dead_letter",))
        # An instance ingest refuses, in an association of its own.
        bad = _without_series_uid(small_phantom.paths[0], tmp_path / "bad")
        subprocess.run(
            ["storescu", "-aec", "INFERGATE", "127.0.0.1", str(gateway.port), str(bad)],
            capture_output=True,
            env=PEER_ENV,
            timeout=60,
            check=False,
        )

        def counted(promql: str, expected: float) -> bool:
            return prometheus.value(promql) == expected

        for promql, expected in (
            ('infergate_jobs_ended_total{plugin="ct_lung",state="done"}', 1),
            ("sum(infergate_instances_received_total)", len(small_phantom.paths)),
            ('sum(infergate_series_completed_total{trigger="quiet"})', 1),
            ('sum(infergate_delivery_attempts_total{outcome="delivered"})', 1),
            ("sum(infergate_instances_refused_total)", 1),
            ('sum(infergate_job_stage_seconds_count{stage="inference"})', 1),
            ('sum(infergate_job_stage_seconds_count{stage="assembly_wait"})', 1),
            ('up{job="triton"}', 1),
        ):
            wait_until(lambda q=promql, e=expected: counted(q, e), 30, f"{promql} == {expected}")
        assert prometheus.value("infergate_oldest_undelivered_result_age_seconds") == 0
        _changes_are_refused_without_a_token(gateway)
        rules = prometheus.api("rules")["groups"]
        assert len(rules[0]["rules"]) == 9
        assert all(rule["health"] == "ok" for rule in rules[0]["rules"]), rules
        firing = [a["labels"]["alertname"] for a in prometheus.api("alerts")["alerts"]]
        assert firing == []

        # Every metric the alert rules and the dashboard query is one the gateway serves.
        served = set(prometheus.api("label/__name__/values"))
        wanted = set(
            re.findall(r"\binfergate_[a-z_]+", (PROMETHEUS_DIR / "infergate-rules.yml").read_text())
        )
        dashboard = json.loads(DASHBOARD.read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                wanted.update(re.findall(r"\binfergate_[a-z_]+", target["expr"]))
        assert len(wanted) > 15
        assert wanted <= served, wanted - served
        # Triton's own, which the dashboard shows beside them, from its metrics port. Triton
        # updates them every 2 s and Prometheus scrapes every 1 s: the study's request may
        # be counted a moment after its SR is in Orthanc.
        wait_until(
            lambda: (
                (prometheus.value('sum(nv_inference_request_success{model="ct_lung_seg"})') or 0)
                >= 1
            ),
            30,
            "Triton's request count scraped",
        )
        triton_wanted = {
            name
            for panel in dashboard["panels"]
            for target in panel["targets"]
            for name in re.findall(r"\bnv_[a-z_]+", target["expr"])
        }
        assert triton_wanted
        assert triton_wanted <= served, triton_wanted - served
    finally:
        prometheus.stop()
