"""A large study end to end, its memory measured and reported.

1,000 slices of 256x256 (a thin-slice CT's count) go from DCMTK's storescu through
``infergate serve`` (ct_lung on the embedded Triton, inputs through shared memory)
to Orthanc. The gateway's whole process tree (listeners, job process, tritonserver
and its Python-backend stub) is sampled while the study goes through; the test
prints its peak memory against the study's int16 volume, and records it as test
properties. What it asserts is the outcome: the lungs found within 5% of the
phantom's truth, the SEG and SR stored, and no process's memory that outgrows the
study many times over (a path that copied the volume to float32 again would).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from infergate.testing import write_chest_ct
from peers import (
    InfergateProcess,
    Orthanc,
    TreeMemory,
    infergate_config,
    storescu,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SLICES, SIZE = 1000, 256
# Far above what the path takes (measured: see the printed figures and the README),
# far below what a float32 copy of the volume in each process came to (~25x).
MAX_TIMES_VOLUME = 10


def test_a_1000_slice_study_goes_through_and_its_memory_is_reported(
    tmp_path: Path,
    orthanc: Orthanc,
    record_property: Callable[[str, object], None],
    capsys: pytest.CaptureFixture[str],
) -> None:
    phantom = write_chest_ct(
        tmp_path / "ct", slices=SLICES, size=SIZE, pixel_spacing=1.4, slice_spacing=0.6
    )
    volume_mib = SLICES * SIZE * SIZE * 2 / 2**20
    config = infergate_config(tmp_path / "var", orthanc)
    config["plugins"] = {"enabled": ["ct_lung"]}
    config["triton"]["shared_memory"] = "on"
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        assert server.process is not None
        time.sleep(5.0)  # the forkserver's warm-up (a 4-slice SEG and SR) is done: idle
        memory = TreeMemory(server.process.pid)
        memory.mark_idle()
        memory.start()
        storescu(server.port, list(phantom.paths))
        wait_until(
            lambda: orthanc.find_instances(phantom.study_uid, "SR"), 600, "the SR in Orthanc", 0.5
        )
        measured = memory.stop()
        done = server.wait_event("inference.job.done", 10)[0]
        findings = server.wait_event("inference.job.findings", 10)[0]
    finally:
        server.stop()

    assert len(orthanc.find_instances(phantom.study_uid, "SEG")) == 1
    assert findings["lungs_found"] == 2
    found = sorted((findings["candidate_1_ml"], findings["candidate_2_ml"]))
    truth = sorted((phantom.right_lung_ml, phantom.left_lung_ml))
    for got, expected in zip(found, truth, strict=True):
        assert got == pytest.approx(expected, rel=0.05)

    report = {
        "study_int16_volume_mib": round(volume_mib),
        "tree_peak_pss_mib": round(measured["peak_pss_mib"]),
        "tree_pss_over_idle_mib": round(measured["pss_over_idle_mib"]),
        "tree_peak_rss_mib": round(measured["peak_rss_mib"]),
        "tree_rss_over_idle_mib": round(measured["rss_over_idle_mib"]),
        "job_process_peak_mib": done.get("peak_memory_mib"),
        "stages_s": {k: v for k, v in done.items() if k.endswith("_s")},
    }
    for key, value in report.items():
        record_property(key, value)
    with capsys.disabled():
        print(f"\nlarge study, {SLICES} x {SIZE} x {SIZE}: {report}")
    assert measured["pss_over_idle_mib"] < MAX_TIMES_VOLUME * volume_mib
