from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pydicom
import pytest
import structlog
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from infergate.assembly import complete_quiet_series, completes_at, completion
from infergate.config import AssemblySettings, CalledAE, IngestSettings, Settings
from infergate.ingest.scp import StorageSCP
from infergate.ingest.spool import Spool
from infergate.plugins import LoadedPlugin
from infergate.store import InstanceRecord, SeriesRow, Store
from infergate.testing import ChestPhantom
from infergate_plugins.ct_lung import plugin as ct_lung
from peers import free_port, storescu, wait_until

SETTINGS = Settings(assembly=AssemblySettings(quiet_period_s=10.0))


class _AnyCT:
    """ct_lung routed on any CT: these series' headers are not on disk (routing sees
    the modality alone), and these tests are about assembly, not ct_lung's rule."""

    spec = replace(ct_lung.spec, rule={"modality": ["CT"]})
    preprocess = staticmethod(ct_lung.preprocess)
    postprocess = staticmethod(ct_lung.postprocess)


def _receive(
    store: Store, uid: str, series: str, modality: str, *, at: float, called: str = "INFERGATE"
) -> None:
    store.record_instance(
        InstanceRecord(
            uid,
            "1.2.840.10008.5.1.4.1.1.2",
            series,
            "1.9",
            modality,
            Path(f"/spool/{uid}.dcm"),
            1,
            "a",
            "SCANNER",
            called,
            uid,
        ),
        now=at,
    )


def test_series_completes_after_the_quiet_period_and_is_routed(
    database: Path | str, tmp_path: Path
) -> None:
    store = Store(database)
    plugins = [LoadedPlugin(_AnyCT(), "test")]
    _receive(store, "1.1", "ct-series", "CT", at=100.0)
    _receive(store, "2.1", "mr-series", "MR", at=100.0)
    assert complete_quiet_series(store, plugins, 105.0, SETTINGS).jobs == []
    assert len(store.receiving_series()) == 2
    with structlog.testing.capture_logs() as logs:
        jobs = complete_quiet_series(store, plugins, 110.0, SETTINGS).jobs
    assert len(jobs) == 1
    assert store.job(jobs[0]).series_uid == "ct-series"
    assert store.receiving_series() == []
    events = [e["event"] for e in logs]
    assert events.count("assembly.series.complete") == 2
    assert events.count("routing.series.unmatched") == 1


def test_a_called_ae_title_runs_only_its_plugins(database: Path | str, tmp_path: Path) -> None:
    settings = Settings(
        assembly=AssemblySettings(quiet_period_s=10.0),
        ingest=IngestSettings(
            called_aes=(CalledAE(ae_title="NO_AI", plugins=()), CalledAE(ae_title="LUNG")),
        ),
    )
    store = Store(database)
    plugins = [LoadedPlugin(_AnyCT(), "test")]
    _receive(store, "1.1", "to-no-ai", "CT", at=100.0, called="NO_AI")
    _receive(store, "2.1", "to-lung", "CT", at=100.0, called="LUNG")
    with structlog.testing.capture_logs() as logs:
        jobs = complete_quiet_series(store, plugins, 110.0, settings).jobs
    assert [store.job(j).series_uid for j in jobs] == ["to-lung"]
    (unrouted,) = [e for e in logs if e["event"] == "routing.series.routed" and not e["plugins"]]
    assert "not enabled for called AE title NO_AI" in unrouted["decisions"][0]["reason"]


def _row(last: float, **fields: Any) -> SeriesRow:
    values: dict[str, Any] = {
        "series_uid": "s",
        "study_uid": "st",
        "modality": "CT",
        "calling_ae": "SCANNER",
        "called_ae": "INFERGATE",
        "last_received_at": last,
        "instance_count": 10,
        "generation": 0,
        "first_received_at": last - 5,
        **fields,
    }
    return SeriesRow(**values)


HINTED = AssemblySettings(quiet_period_s=10, release_quiet_period_s=2, max_series_age_s=600)


@pytest.mark.parametrize(
    ("group", "now", "expected"),
    [
        ([_row(100)], 109.9, None),
        ([_row(100)], 110, "quiet"),
        # Released after the last instance, nobody else sending: the shorter wait.
        ([_row(100, released_at=100.5)], 102.4, None),
        ([_row(100, released_at=100.5)], 102.5, "released"),
        # Another association that sent this series is still open: no hint.
        ([_row(100, released_at=100.5, open_senders=1)], 105, None),
        # An instance came after the release (over another association): no hint.
        ([_row(101, released_at=100.5)], 105, None),
        # Receiving for longer than the maximum age, however busy.
        ([_row(700, first_received_at=100)], 700, "max_age"),
        # A study: complete when its last series is quiet, released when all are.
        ([_row(100), _row(105, series_uid="t")], 114, None),
        ([_row(100), _row(105, series_uid="t")], 115, "quiet"),
        ([_row(100, released_at=101), _row(105, series_uid="t")], 108, None),
        ([_row(100, released_at=106), _row(105, series_uid="t", released_at=106)], 108, "released"),
    ],
)
def test_completion(group: list[SeriesRow], now: float, expected: str | None) -> None:
    assert completion(group, now, HINTED) == expected


@pytest.mark.parametrize(
    "group",
    [
        [_row(100)],
        [_row(100, released_at=100.5)],
        [_row(100, released_at=100.5, open_senders=1)],
        [_row(101, released_at=100.5)],
        [_row(700, first_received_at=100)],
        [_row(100), _row(105, series_uid="t")],
        [_row(100, released_at=106), _row(105, series_uid="t", released_at=106)],
    ],
)
def test_completes_at_is_the_first_moment_the_group_is_complete(group: list[SeriesRow]) -> None:
    at = completes_at(group, HINTED)
    assert completion(group, at - 0.01, HINTED) is None
    assert completion(group, at, HINTED) is not None


def test_a_round_says_when_the_next_series_will_be_complete(
    database: Path | str, tmp_path: Path
) -> None:
    store = Store(database)
    plugins = [LoadedPlugin(_AnyCT(), "test")]
    assert complete_quiet_series(store, plugins, 100.0, SETTINGS).next_at is None
    _receive(store, "1.1", "early", "CT", at=100.0)
    _receive(store, "2.1", "later", "CT", at=103.0)
    assert complete_quiet_series(store, plugins, 105.0, SETTINGS).next_at == 110.0
    assembled = complete_quiet_series(store, plugins, 110.0, SETTINGS)
    assert len(assembled.jobs) == 1
    assert assembled.next_at == 113.0
    # Paused for a restart: the quiet period runs from when instances were taken again.
    assert complete_quiet_series(store, plugins, 110.0, SETTINGS, resumed_at=109.0).next_at == 119.0


def test_the_release_hint_is_off_unless_configured() -> None:
    settings = AssemblySettings(quiet_period_s=10)
    assert completion([_row(100, released_at=100.5)], 105, settings) is None


def test_series_of_a_study_complete_together(database: Path | str, tmp_path: Path) -> None:
    settings = Settings(assembly=AssemblySettings(quiet_period_s=10.0, scope="study"))
    store = Store(database)
    plugins = [LoadedPlugin(_AnyCT(), "test")]
    _receive(store, "1.1", "chest", "CT", at=100.0)
    _receive(store, "2.1", "scout", "CT", at=108.0)  # same study, later
    assert complete_quiet_series(store, plugins, 112.0, settings).jobs == []
    with structlog.testing.capture_logs() as logs:
        jobs = complete_quiet_series(store, plugins, 118.0, settings).jobs
    assert sorted(store.job(j).series_uid for j in jobs) == ["chest", "scout"]
    (study,) = [e for e in logs if e["event"] == "assembly.study.complete"]
    assert (study["series"], study["trigger"]) == (2, "quiet")


@pytest.fixture
def hinted(database: Path | str, tmp_path: Path) -> Iterator[tuple[Settings, Store]]:
    """A listener in this process, with the release hint on, and its store."""
    settings = Settings(
        ingest=IngestSettings(host="127.0.0.1", port=free_port(), min_free_bytes=0),
        assembly=AssemblySettings(quiet_period_s=600, release_quiet_period_s=0.5),
    )
    store = Store(database)
    scp = StorageSCP(settings.ingest, Spool(tmp_path / "spool"), store)
    scp.start()
    yield settings, store
    scp.stop()
    store.close()


def test_a_released_association_lets_its_series_complete_early(
    hinted: tuple[Settings, Store], small_phantom: ChestPhantom
) -> None:
    settings, store = hinted
    storescu(settings.ingest.port, list(small_phantom.paths[:5]))  # sends, then releases
    (series,) = store.receiving_series()
    assert series.released_at is not None
    assert series.open_senders == 0
    with structlog.testing.capture_logs() as logs:
        jobs = complete_quiet_series(store, [], series.released_at + 0.5, settings).jobs
    assert jobs == []
    (done,) = [e for e in logs if e["event"] == "assembly.series.complete"]
    assert (done["trigger"], done["instances"]) == ("released", 5)


def test_an_open_association_holds_the_release_hint(
    hinted: tuple[Settings, Store], small_phantom: ChestPhantom
) -> None:
    settings, store = hinted
    # A PACS sending one series over two associations: one still open.
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian])
    still_open = ae.associate("127.0.0.1", settings.ingest.port, ae_title="INFERGATE")
    assert still_open.send_c_store(pydicom.dcmread(small_phantom.paths[0])).Status == 0
    storescu(settings.ingest.port, list(small_phantom.paths[1:5]))
    (series,) = store.receiving_series()
    assert series.open_senders == 1
    assert completion([series], (series.released_at or 0.0) + 5, settings.assembly) is None
    still_open.release()
    wait_until(lambda: store.receiving_series()[0].open_senders == 0, 10, "the release")


def test_the_quiet_period_of_a_series_runs_from_the_gateways_start_after_an_outage(
    database: Path | str,
    tmp_path: Path,
) -> None:
    """Down longer than the quiet period: its senders could not send meanwhile, so at
    the restart the series is not complete until quiet since the start."""
    store = Store(database)
    plugins = [LoadedPlugin(_AnyCT(), "test")]
    _receive(store, "1.1", "ct-series", "CT", at=100.0)
    # Restarted at 130, 30 s after the last instance (quiet period 10 s).
    assert complete_quiet_series(store, plugins, 131.0, SETTINGS, resumed_at=130.0).jobs == []
    assert len(complete_quiet_series(store, plugins, 140.0, SETTINGS, resumed_at=130.0).jobs) == 1
