"""Several called AE titles on one listener, each with its own plugins and destination.

Real peers: storescu sends to two titles of one Infergate process; two Orthanc
processes are the two sites' PACS.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from infergate.testing import ChestPhantom
from peers import InfergateProcess, Orthanc, infergate_config, storescu

pytestmark = pytest.mark.integration


def test_each_called_ae_title_has_its_plugins_and_its_destination(
    tmp_path: Path, orthanc: Orthanc, small_phantom: ChestPhantom, head_ct: list[Path]
) -> None:
    research = Orthanc(tmp_path / "research-pacs", ae_title="RESEARCHPACS")
    research.start()
    config = infergate_config(tmp_path / "var", orthanc)
    config["ingest"]["called_aes"] = [
        {
            "ae_title": "IG_RESEARCH",
            "destination": {
                "ae_title": research.ae_title,
                "host": "127.0.0.1",
                "port": research.dicom_port,
            },
        },
        {"ae_title": "IG_ARCHIVE", "plugins": []},
    ]
    server = InfergateProcess(tmp_path / "infergate", config)
    server.workdir.mkdir()
    try:
        server.start()
        storescu(server.port, list(small_phantom.paths), called_ae="IG_RESEARCH")
        storescu(server.port, head_ct, called_ae="IG_ARCHIVE")
        server.wait_event("export.sent", timeout=180)
        routed = server.wait_event("routing.series.routed", timeout=30, count=2)
        server.stop()
        # The research title's results went to the research PACS, and only there, sent
        # with the title the study was sent to.
        for modality in ("SEG", "SR"):
            (found,) = research.find_instances(small_phantom.study_uid, modality)
            metadata = research.get(f"/instances/{found}/metadata?expand")
            assert metadata["RemoteAET"] == "IG_RESEARCH"
            assert orthanc.find_instances(small_phantom.study_uid, modality) == []
    finally:
        server.stop()
        research.stop()
    # The archive title runs no plugin: the head CT got no job, and the log says why.
    head_series = str(pydicom.dcmread(head_ct[0], stop_before_pixels=True).SeriesInstanceUID)
    (archived,) = [e for e in routed if e["series_uid"] == head_series]
    assert archived["plugins"] == []
    assert "not enabled for called AE title IG_ARCHIVE" in archived["decisions"][0]["reason"]
    sent = [e for e in server.events() if e["event"] == "export.sent"]
    assert [(e["destination"], e["calling_ae"]) for e in sent] == [("RESEARCHPACS", "IG_RESEARCH")]
