"""SIGKILL while receiving: every acknowledged instance survives byte for byte, nothing
half-written stays, and the series' job runs exactly once after the restart."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from infergate.testing import ChestPhantom
from peers import InfergateProcess, Orthanc, infergate_config

pytestmark = pytest.mark.integration

ACKNOWLEDGED_BEFORE_KILL = 15


def _send(
    port: int,
    paths: list[Path],
    on_success: threading.Event | None = None,
    pause_after: int | None = None,
    resume: threading.Event | None = None,
) -> list[str]:
    """C-STORE ``paths`` one by one; returns the SOP Instance UIDs acknowledged with 0x0000."""
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", port, ae_title="INFERGATE")
    assert assoc.is_established
    acknowledged: list[str] = []
    for path in paths:
        ds = pydicom.dcmread(path)
        if not assoc.is_established:
            break
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError:  # the association died under us: the server was killed
            break
        if "Status" not in status or status.Status != 0x0000:
            break
        acknowledged.append(str(ds.SOPInstanceUID))
        if len(acknowledged) == pause_after and on_success is not None:
            on_success.set()
            if resume is not None:
                resume.wait(30)
    if assoc.is_established:
        assoc.release()
    return acknowledged


@pytest.mark.parametrize("moment", ["right_after_a_success", "while_receiving"])
def test_sigkill_during_ingest_loses_no_acknowledged_instance(
    tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom, moment: str
) -> None:
    server = InfergateProcess(
        tmp_path / "infergate", infergate_config(tmp_path / "var", orthanc, quiet_s=4.0)
    )
    server.workdir.mkdir()
    paths = sorted(small_phantom.paths)
    originals = {str(pydicom.dcmread(p).SOPInstanceUID): p for p in paths}
    try:
        server.start()
        reached = threading.Event()
        resume = threading.Event()
        killed: list[bool] = []

        def killer() -> None:
            reached.wait(60)
            server.kill()
            killed.append(True)
            resume.set()

        thread = threading.Thread(target=killer)
        thread.start()
        acknowledged = _send(
            server.port,
            paths,
            on_success=reached,
            pause_after=ACKNOWLEDGED_BEFORE_KILL,
            # Right after a success the sender waits for the kill; otherwise it sends on.
            resume=resume if moment == "right_after_a_success" else None,
        )
        thread.join(60)
        assert killed
        assert len(acknowledged) >= ACKNOWLEDGED_BEFORE_KILL
        assert len(acknowledged) < len(paths)

        spool = tmp_path / "var" / "spool"
        spooled = {
            str(pydicom.dcmread(p).SOPInstanceUID): p for p in (spool / "instances").iterdir()
        }
        for uid in acknowledged:
            assert uid in spooled, "an acknowledged instance was lost"
            received = pydicom.dcmread(spooled[uid])
            original = pydicom.dcmread(originals[uid])
            assert received == original  # every element, pixel data included

        time.sleep(5.0)  # down for longer than the quiet period, as a real outage is
        server.start()
        # Nothing half-written stays (each listener process has a tmp/ folder of its own).
        assert [p for p in (spool / "tmp").rglob("*") if p.is_file()] == []
        # The sender comes back with what was not acknowledged.
        rest = [originals[uid] for uid in originals if uid not in set(acknowledged)]
        assert len(_send(server.port, rest)) == len(rest)
        server.wait_event("export.sent", timeout=120)
        server.wait_event("inference.job.done", timeout=10)
        done = [e for e in server.events() if e["event"] == "assembly.series.complete"]
        assert [e["instances"] for e in done] == [len(paths)]
    finally:
        server.stop()
    assert len([e for e in server.events() if e["event"] == "inference.job.done"]) == 1
    assert len(orthanc.find_instances(small_phantom.study_uid, "SEG")) == 1
    assert len(orthanc.find_instances(small_phantom.study_uid, "SR")) == 1
