"""Plugins that fail as AI teams' code and models do, through ``infergate serve``: one
that raises in its postprocess, and a Triton model that never answers.

The plugins come from their own package (tests/data/faulty_plugins), installed with
pip; the hung model is served by the embedded tritonserver beside the reference
models. Each faulty plugin runs only on series sent to its own called AE title.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infergate.testing import ChestPhantom, HeadPhantom
from peers import (
    REPO,
    InfergateProcess,
    Orthanc,
    copy_as_new_study,
    infergate_config,
    pip_install,
    storescu,
)

pytestmark = pytest.mark.integration

PACKAGE = REPO / "tests" / "data" / "faulty_plugins"
# A job of the hung model is failed this long after it started (work.job_deadline_s):
# long enough for the other studies' jobs, which take seconds, to run meanwhile.
JOB_DEADLINE_S = 90


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pip_install(PACKAGE, tmp_path_factory.mktemp("site"), tmp_path_factory.mktemp("build"))


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference models and the hung one, in one model repository."""
    target = tmp_path_factory.mktemp("models") / "model_repository"
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO / "model_repository", target, ignore=ignore)
    shutil.copytree(PACKAGE / "model_repository" / "hangs", target / "hangs", ignore=ignore)
    return target


@pytest.fixture
def server(
    tmp_path: Path, orthanc: Orthanc, site: Path, repository: Path
) -> Iterator[InfergateProcess]:
    config = infergate_config(tmp_path / "var", orthanc, quiet_s=0.5)
    config["triton"]["model_repository"] = str(repository)
    config["ingest"]["called_aes"] = [
        {"ae_title": title.upper(), "plugins": [title]}
        for title in ("raises", "hangs", "hangs_too")
    ]
    config["plugins"] = {"enabled": ["ct_lung", "ct_head_bleed", "raises", "hangs", "hangs_too"]}
    process = InfergateProcess(tmp_path / "infergate", config, extra_env={"PYTHONPATH": str(site)})
    process.workdir.mkdir()
    yield process
    process.stop()


def _of_study(events: list[dict[str, Any]], name: str, study_uid: str) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == name and e.get("study_uid") == study_uid]


def test_a_plugin_that_raises_fails_its_job_and_the_next_study_gets_its_results(
    server: InfergateProcess, orthanc: Orthanc, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    server.start()
    study, paths = copy_as_new_study(list(small_phantom.paths), tmp_path / "raises")
    storescu(server.port, paths, called_ae="RAISES")
    (failed,) = server.wait_event("inference.job.failed", timeout=120, fail_on=())
    assert failed["plugin"] == "raises"
    assert failed["study_uid"] == study
    assert failed["reason"].startswith(
        "plugin raises failed in postprocess: RuntimeError raised in"
    )
    assert "faulty_plugins/__init__.py" in failed["reason"]
    assert "a bug in the plugin" not in failed["reason"]  # messages may quote headers
    storescu(server.port, list(small_phantom.paths))
    (delivered,) = server.wait_event(
        "export.delivered", timeout=120, fail_on=("export.dead_letter",)
    )
    assert delivered["study_uid"] == small_phantom.study_uid
    assert server.process is not None
    assert server.process.poll() is None
    assert len(orthanc.find_instances(small_phantom.study_uid, "SR")) == 1
    assert orthanc.get("/statistics")["CountInstances"] == 2  # its SEG and SR, no more


@pytest.mark.slow
def test_a_hung_model_holds_only_its_own_slots_and_urgent_work_starts_past_it(
    server: InfergateProcess,
    orthanc: Orthanc,
    small_phantom: ChestPhantom,
    bleed_head: HeadPhantom,
    tmp_path: Path,
) -> None:
    """Slots as on a 2-core machine, fixed: 4, one kept for urgent jobs, 2 per plugin.

    Three studies for the hung model: two of its jobs run (its plugin's limit), the
    third waits. A chest CT's results arrive meanwhile, in the normal slot left free.
    A second plugin on the hung model takes that slot too; an urgent head CT then
    starts in the slot kept for it, and its results arrive while all three hung jobs
    still run (orderings, not timings). At the deadline the hung jobs fail with that
    reason and the waiting one starts.
    """
    server.config["work"] = {
        "inference_slots": 4,
        "urgent_reserved_slots": 1,
        "per_plugin_slots": 2,
        "job_deadline_s": JOB_DEADLINE_S,
        "stop_grace_s": 1,
    }
    server.start()
    hung = []
    for n in range(3):
        study, paths = copy_as_new_study(list(small_phantom.paths), tmp_path / f"hung{n}")
        storescu(server.port, paths, called_ae="HANGS")
        hung.append(study)
    server.wait_event("inference.job.started", timeout=120, count=2)
    server.wait_event("assembly.series.complete", timeout=60, count=3)

    storescu(server.port, list(small_phantom.paths))
    server.wait_event("export.delivered", timeout=120, fail_on=("export.dead_letter",))
    events = server.events()
    assert len(orthanc.find_instances(small_phantom.study_uid, "SR")) == 1
    started = [e for e in events if e["event"] == "inference.job.started"]
    assert [e["plugin"] for e in started].count("hangs") == 2  # the third one waits
    assert not [e for e in events if e["event"] == "inference.job.failed"]

    too, paths = copy_as_new_study(list(small_phantom.paths), tmp_path / "hung_too")
    storescu(server.port, paths, called_ae="HANGS_TOO")
    server.wait_event("inference.job.started", timeout=120, count=4)  # 2 hangs, ct_lung, too
    storescu(server.port, list(bleed_head.paths))
    server.wait_event("export.delivered", timeout=180, count=2, fail_on=("export.dead_letter",))
    events = server.events()
    (urgent,) = _of_study(events, "inference.job.started", bleed_head.study_uid)
    assert urgent["priority"] == "urgent"
    assert len(orthanc.find_instances(bleed_head.study_uid, "SEG")) == 1
    # ct_lung and ct_head_bleed are done; no job of the hung model has ended.
    done = [e["plugin"] for e in events if e["event"] == "inference.job.done"]
    assert sorted(done) == ["ct_head_bleed", "ct_lung"]
    assert not [e for e in events if e["event"] == "inference.job.failed"]

    failed = server.wait_event(
        "inference.job.failed", timeout=JOB_DEADLINE_S + 60, count=2, fail_on=()
    )
    assert {e["study_uid"] for e in failed[:2]} <= set(hung[:2])
    assert all(
        e["reason"] == f"the job ran past its deadline of {JOB_DEADLINE_S} s (work.job_deadline_s)"
        for e in failed
    )
    started = server.wait_event("inference.job.started", timeout=30, count=6, fail_on=())
    assert {e["study_uid"] for e in started} >= {*hung, too}
    assert server.process is not None
    assert server.process.poll() is None


def test_sigkill_while_a_complete_series_waits_for_a_slot_runs_it_once_after(
    server: InfergateProcess, orthanc: Orthanc, small_phantom: ChestPhantom, tmp_path: Path
) -> None:
    """The one normal slot held by a hung job, a chest CT complete and queued behind
    it: SIGKILL. After a restart with a slot more, the chest CT runs once and its
    results arrive once; its series is not completed again."""
    server.config["work"] = {
        "inference_slots": 2,
        "urgent_reserved_slots": 1,
        "stop_grace_s": 1,
    }
    server.start()
    _, paths = copy_as_new_study(list(small_phantom.paths), tmp_path / "hung")
    storescu(server.port, paths, called_ae="HANGS")
    server.wait_event("inference.job.started", timeout=120)
    storescu(server.port, list(small_phantom.paths))
    server.wait_event("assembly.series.complete", timeout=60, count=2)
    time.sleep(1.0)  # rounds of the scheduler go by: the job stays queued
    assert [e["plugin"] for e in server.events() if e["event"] == "inference.job.started"] == [
        "hangs"
    ]
    server.kill()
    server.config["work"]["inference_slots"] = 3
    server.start()
    (delivered,) = server.wait_event(
        "export.delivered", timeout=120, fail_on=("export.dead_letter",)
    )
    assert delivered["study_uid"] == small_phantom.study_uid
    server.stop()
    events = server.events()
    assert len([e for e in events if e["event"] == "assembly.series.complete"]) == 2
    done = [e["plugin"] for e in events if e["event"] == "inference.job.done"]
    assert done == ["ct_lung"]
    assert len(orthanc.find_instances(small_phantom.study_uid, "SEG")) == 1
    assert len(orthanc.find_instances(small_phantom.study_uid, "SR")) == 1
    assert orthanc.get("/statistics")["CountInstances"] == 2
