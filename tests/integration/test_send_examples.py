"""The README's send examples, as a new user runs them: a CD or PACS export with its
DICOMDIR, sent with the command the README gives, reaches Infergate whole.

Real peers: ``infergate serve``, DCMTK's ``dcmmkdir`` (builds the DICOMDIR) and
``storescu``; the real head CT of tests/data as the disc's content.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from pydicom.uid import CTImageStorage, MediaStorageDirectoryStorage
from pynetdicom import AE

from peers import PEER_ENV, InfergateProcess, infergate_config, require_program

pytestmark = pytest.mark.integration


def _cd_export(files: list[Path], root: Path) -> Path:
    """A disc as a PACS or a scanner writes one: DICOMDIR at the top, the instances
    under DICOM/ with file IDs of eight characters and no extension."""
    (root / "DICOM").mkdir(parents=True)
    for index, source in enumerate(files, start=1):
        shutil.copy(source, root / "DICOM" / f"IM{index:06d}")
    subprocess.run(
        # +I: invent the type 1 attributes the real data leaves empty (Study ID)
        [require_program("dcmmkdir"), "+r", "-Pgp", "+I", "+D", "DICOMDIR", "DICOM"],
        cwd=root,
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert (root / "DICOMDIR").exists()
    return root


def test_the_readme_command_sends_a_cd_export_whole_and_the_dicomdir_is_skipped(
    tmp_path: Path, head_ct: list[Path]
) -> None:
    disc = _cd_export(head_ct, tmp_path / "cdrom")
    config = infergate_config(tmp_path / "var", None, quiet_s=0.5)
    config["plugins"] = {"enabled": ["ct_head_bleed"]}
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        # The README's command, with this gateway's port.
        sent = subprocess.run(
            [
                "storescu", "-aec", "INFERGATE", "-aet", "MYSCANNER", "+sd", "+r", "-nh",
                "--required", "127.0.0.1", str(server.port), str(disc),
            ],
            capture_output=True,
            text=True,
            env=PEER_ENV,
            timeout=120,
            check=False,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stdout + sent.stderr
        # A sender that offers the DICOMDIR itself has its presentation context refused.
        ae = AE(ae_title="MYSCANNER")
        ae.add_requested_context(MediaStorageDirectoryStorage)
        ae.add_requested_context(CTImageStorage)
        association = ae.associate("127.0.0.1", server.port, ae_title="INFERGATE")
        assert association.is_established
        (refused,) = association.rejected_contexts
        association.release()
        assert refused.abstract_syntax == MediaStorageDirectoryStorage
        assert refused.result == 0x03  # abstract syntax not supported
        (done,) = server.wait_event("inference.job.done", timeout=180)
        assert done["plugin"] == "ct_head_bleed"
        (complete,) = [e for e in server.events() if e["event"] == "assembly.series.complete"]
        assert complete["instances"] == len(head_ct)
    finally:
        server.stop()
    # The DICOMDIR is no instance to store: storescu skips it and goes on.
    assert "DICOMDIR, ignoring file" in sent.stdout + sent.stderr
    assert not [e for e in server.events() if e["event"] == "ingest.instance.refused"]
