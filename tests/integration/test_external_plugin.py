"""A plugin from a package of its own, installed with pip beside Infergate: found through
its entry point, checked against the live model, routed, and its SR in Orthanc."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from infergate.testing import ChestPhantom
from peers import (
    PEER_ENV,
    REPO,
    InfergateProcess,
    Orthanc,
    dciodvfy_errors,
    infergate_config,
    pip_install,
    run_cli,
    storescu,
    walk_content,
)

pytestmark = pytest.mark.integration

PACKAGE = REPO / "tests" / "data" / "external_plugin"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lung_total package, installed by pip into a folder of its own."""
    return pip_install(PACKAGE, tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("build"))


def _cli(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, cwd=cwd, env={**PEER_ENV, "PYTHONPATH": str(site)})


def test_the_installed_plugin_is_found_checked_and_routed(
    site: Path, tmp_path: Path, small_phantom: ChestPhantom
) -> None:
    listed = _cli(site, "plugins", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "lung_total 0.1.0" in listed.stdout
    assert "from: entry point 'lung_total' (lung_total:plugin)" in listed.stdout

    config = infergate_config(tmp_path / "var", None)
    config["plugins"] = {"enabled": ["lung_total"]}
    path = tmp_path / "ig.yaml"
    path.write_text(yaml.safe_dump(config))
    routed = _cli(
        site, "route", "explain", str(small_phantom.directory), "--config", str(path), cwd=tmp_path
    )
    assert routed.returncode == 0, routed.stderr
    assert "lung_total: runs, priority normal" in routed.stdout

    checked = _cli(site, "check", "--config", str(path), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert '"plugin": "lung_total"' in checked.stdout
    assert '"event": "check.ok"' in checked.stdout

    conformance = subprocess.run(
        [
            sys.executable,
            "-c",
            "import lung_total, infergate.testing as t; print(t.check_plugin(lung_total.plugin))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**PEER_ENV, "PYTHONPATH": str(site)},
        check=True,
    )
    assert conformance.stdout.strip() == "[]"


def test_the_installed_plugin_runs_end_to_end(
    site: Path, tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom
) -> None:
    config = infergate_config(tmp_path / "var", orthanc)
    config["plugins"] = {"enabled": ["lung_total"]}
    server = InfergateProcess(tmp_path / "ig", config, extra_env={"PYTHONPATH": str(site)})
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(small_phantom.paths))
        (sent,) = server.wait_event("export.sent", timeout=120)
        (findings,) = server.wait_event("inference.job.findings", timeout=5)
    finally:
        server.stop()
    assert sent["kinds"] == ["sr"]
    truth = small_phantom.right_lung_ml + small_phantom.left_lung_ml
    assert findings["total_lung_ml"] == pytest.approx(truth, rel=0.03)
    (found,) = orthanc.find_instances(small_phantom.study_uid, "SR")
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.instance_file(found))
    assert dciodvfy_errors(sr_path) == []
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in walk_content(pydicom.dcmread(sr_path).ContentSequence, library=False)
        if item.ValueType == "NUM"
    ]
    assert volumes == [pytest.approx(truth, rel=0.03)]
