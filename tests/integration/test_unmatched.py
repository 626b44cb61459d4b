"""routing.unmatched: a series no plugin runs on is logged, and forwarded when configured."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import structlog
from workers import run_until_idle

from infergate.config import Settings, load_settings
from infergate.errors import ConfigError
from infergate.inference.triton import TritonClient
from infergate.plugins import discover
from infergate.store import InstanceRecord, Store
from infergate.work.states import JobKind, JobState, ResultState
from peers import Orthanc

pytestmark = pytest.mark.integration


def _receive(store: Store, paths: list[Path]) -> tuple[str, list[str]]:
    """Record ``paths`` as received from SCANNER long ago; the study UID and SOP UIDs."""
    uids = []
    study = ""
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        study = str(ds.StudyInstanceUID)
        uids.append(str(ds.SOPInstanceUID))
        store.record_instance(
            InstanceRecord(
                str(ds.SOPInstanceUID),
                str(ds.SOPClassUID),
                str(ds.SeriesInstanceUID),
                study,
                str(ds.Modality),
                path,
                path.stat().st_size,
                "assoc",
                "SCANNER",
                "INFERGATE",
                str(ds.SOPInstanceUID),
            ),
            now=1.0,
        )
    return study, uids


def _run(store: Store, unmatched: dict[str, object]) -> None:
    # ct_lung is installed but a rule keeps it to chests: the head CT matches nothing.
    rule = {"name": "chest", "plugins": ["ct_lung"], "when": {"body_part": ["CHEST"]}}
    settings = Settings.model_validate(
        {
            "assembly": {"quiet_period_s": 0.01},
            "routing": {"rules": [rule], "unmatched": unmatched},
        }
    )
    client = TritonClient("127.0.0.1:1", timeout_s=1)  # never called: nothing is inferred
    plugins = [p for p in discover() if p.spec.name == "ct_lung"]
    try:
        run_until_idle(settings, store, plugins, client)
    finally:
        client.close()


def test_an_unmatched_series_is_forwarded_as_received(
    tmp_path: Path, head_ct: list[Path], orthanc: Orthanc
) -> None:
    store = Store(tmp_path / "s.db")
    study, uids = _receive(store, head_ct)
    destination = {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port}
    with structlog.testing.capture_logs() as logs:
        _run(store, {"action": "forward", "destination": destination})

    (unmatched,) = [e for e in logs if e["event"] == "routing.series.unmatched"]
    assert unmatched["action"] == "forward"
    assert unmatched["destination"] == orthanc.ae_title
    (job,) = store.jobs()
    assert (job.kind, job.plugin, job.state) == (JobKind.FORWARD, "", JobState.DONE)
    assert set(store.result_states().values()) == {ResultState.DELIVERED}
    (sent,) = [e for e in logs if e["event"] == "export.sent"]
    assert sent["destination"] == orthanc.ae_title
    assert sorted(sent["sop_instance_uids"]) == sorted(uids)

    stored = orthanc.find_instances(study, "CT")
    assert len(stored) == len(head_ct)
    # As received: the pixel data Orthanc keeps is the pixel data the scanner sent.
    original = {
        str(ds.SOPInstanceUID): ds.PixelData for ds in (pydicom.dcmread(p) for p in head_ct)
    }
    for orthanc_id in stored[:3]:
        copy = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(orthanc_id)))
        assert copy.PixelData == original[str(copy.SOPInstanceUID)]


def test_an_unmatched_series_is_ignored_by_default_and_logged(
    tmp_path: Path, head_ct: list[Path]
) -> None:
    store = Store(tmp_path / "s.db")
    _receive(store, head_ct)
    with structlog.testing.capture_logs() as logs:
        _run(store, {})
    (unmatched,) = [e for e in logs if e["event"] == "routing.series.unmatched"]
    assert (unmatched["action"], unmatched["destination"]) == ("ignore", None)
    assert store.jobs() == []
    assert store.results() == []


def test_forward_without_a_destination_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "infergate.yaml"
    config.write_text("routing:\n  unmatched: {action: forward}\n")
    with pytest.raises(ConfigError, match=r"routing\.unmatched.*forward needs a destination"):
        load_settings(config)
