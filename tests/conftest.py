"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from infergate.testing import ChestPhantom, write_chest_ct
from peers import SHARED_DATA


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
    """Real head CT with gantry tilt from ../shared/data (must exist: no skip)."""
    folder = SHARED_DATA / "ct-head-tilt"
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
