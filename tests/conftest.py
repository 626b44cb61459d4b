"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import importlib.util
import logging
import shutil
import subprocess
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pydicom
import pytest
import structlog
from listeners import Listener, ListenerFactory
from postgres import PostgresServer, start_postgres

from infergate.config import IngestSettings
from infergate.ingest.scp import StorageSCP
from infergate.ingest.spool import Spool
from infergate.store import Store
from infergate.store.postgres import PostgresBackend
from infergate.testing import (
    LEFT_FRONTAL,
    RIGHT_PARIETAL,
    ChestPhantom,
    HeadPhantom,
    write_chest_ct,
    write_head_ct,
)
from peers import REAL_DATA, REPO, Orthanc, free_port


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL server for this test process, started on first use."""
    server = start_postgres()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.root, ignore_errors=True)


@pytest.fixture
def closing_pools(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every PostgreSQL store the test opens is closed after it. Left to the garbage
    collector, its pool's ``__del__`` may run on one of the pool's own threads, which
    cannot join itself (an error in whichever test is running then)."""
    opened: list[PostgresBackend] = []
    original = PostgresBackend.__init__

    def keeping(self: PostgresBackend, url: str, *, pool_size: int = 4) -> None:
        original(self, url, pool_size=pool_size)
        opened.append(self)

    monkeypatch.setattr(PostgresBackend, "__init__", keeping)
    yield
    for backend in opened:
        backend.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Path | str:
    """Where a new, empty state store is, on each backend in turn: a SQLite file, or
    a database of the tests' PostgreSQL server."""
    if request.param == "sqlite":
        return tmp_path / "state.db"
    request.getfixturevalue("closing_pools")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database()


@pytest.fixture(scope="session")
def chest_phantom(tmp_path_factory: pytest.TempPathFactory) -> ChestPhantom:
    """The 100-slice 512x512 synthetic chest CT the issue asks for."""
    return write_chest_ct(tmp_path_factory.mktemp("chest-phantom"))


@pytest.fixture(scope="session")
def small_phantom(tmp_path_factory: pytest.TempPathFactory) -> ChestPhantom:
    """A smaller chest CT for fast unit tests (40 slices of 256x256, 1.4 mm pixels)."""
    return write_chest_ct(
        tmp_path_factory.mktemp("small-phantom"),
        slices=40,
        size=256,
        pixel_spacing=1.4,
        slice_spacing=6.0,
    )


@pytest.fixture(scope="session")
def head_ct() -> list[Path]:
    """Real head CT with gantry tilt, tests/data/ct-head-tilt (its README says whence)."""
    folder = REAL_DATA / "ct-head-tilt"
    files = sorted(folder.glob("*.dcm"))
    assert files, f"real test data missing: {folder}"
    return files


@pytest.fixture
def strict_pydicom() -> Iterator[None]:
    """highdicom's habit: pydicom raises on invalid values while we write."""
    settings = pydicom.config.settings
    before = settings.writing_validation_mode
    settings.writing_validation_mode = pydicom.config.RAISE
    yield
    settings.writing_validation_mode = before


def _model_module(name: str) -> ModuleType:
    """A Python-backend Triton model's module, imported without Triton."""
    path = REPO / "model_repository" / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"{name}_model", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def lung_model() -> ModuleType:
    """The ct_lung_seg Triton model's module, to test its algorithm."""
    return _model_module("ct_lung_seg")


@pytest.fixture(scope="session")
def bleed_model() -> ModuleType:
    """The ct_head_bleed Triton model's module, to test its algorithm."""
    return _model_module("ct_head_bleed")


@pytest.fixture(scope="session")
def cxr_model() -> ModuleType:
    """The cxr_quality Triton model's module, to test its checks."""
    return _model_module("cxr_quality")


@pytest.fixture(scope="session")
def unet_model() -> ModuleType:
    """The ct_lung_unet model's module (onnxruntime on the committed network), outside
    Triton."""
    return _model_module("ct_lung_unet")


@pytest.fixture(scope="session")
def bleed_head(tmp_path_factory: pytest.TempPathFactory) -> HeadPhantom:
    """A synthetic head CT with a right parietal and a left frontal hyperdensity."""
    return write_head_ct(tmp_path_factory.mktemp("bleed-head"), (RIGHT_PARIETAL, LEFT_FRONTAL))


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """A test that configures logging binds the stream pytest gave it; undo that after."""
    showwarning = warnings.showwarning
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers = []
    warnings.showwarning = showwarning


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    """Orthanc as the PACS, with its own config and storage, on loopback ports."""
    pacs = Orthanc(tmp_path / "orthanc")
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.fixture
def make_listener(tmp_path: Path) -> Iterator[ListenerFactory]:
    """Start a listener with ``IngestSettings`` overrides; stopped after the test."""
    started: list[Listener] = []

    def make(spool_root: Path | None = None, **overrides: Any) -> Listener:
        port = free_port()
        values: dict[str, Any] = {"network_timeout_s": 10, "min_free_bytes": 0, **overrides}
        settings = IngestSettings(host="127.0.0.1", port=port, **values)
        store = Store(tmp_path / f"state-{port}.db")
        spool = Spool(spool_root or tmp_path / f"spool-{port}")
        scp = StorageSCP(settings, spool, store)
        scp.start()
        started.append(Listener(scp, store, spool, port))
        return started[-1]

    yield make
    for listener in started:
        listener.scp.stop()
        listener.store.close()


@pytest.fixture
def listener(make_listener: ListenerFactory) -> Listener:
    return make_listener()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 48 MiB tmpfs, so the spool can really run out of space (needs root, as in CI)."""
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)],
        check=True,
        capture_output=True,
    )
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False, capture_output=True)
