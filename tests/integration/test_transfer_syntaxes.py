"""Every transfer syntax a scanner may use goes through to a result: received as is,
decoded for the plugin, SEG and SR in the PACS. The compressed series are made by
independent encoders (DCMTK's dcmcjpeg, dcmcjpls, dcmcrle; OpenJPEG through pydicom)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000,
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, _config
from test_end_to_end import _sr_volumes

from infergate.testing import ChestPhantom
from peers import InfergateProcess, Orthanc, infergate_config, require_program, storescu

pytestmark = pytest.mark.integration

# storescu's option that proposes each syntax (it proposes uncompressed ones only, unless
# told); JPEG Lossless Process 14 has none, so pynetdicom sends those files as they are.
PROPOSE = {
    JPEGBaseline8Bit: "-xy",
    JPEGLosslessSV1: "-xs",
    JPEGExtended12Bit: "-xx",
    JPEGLSLossless: "-xt",
    JPEGLSNearLossless: "-xu",
    RLELossless: "-xr",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    DeflatedExplicitVRLittleEndian: "-xd",  # storescu deflates while sending
}

# transfer syntax -> how to make it: a DCMTK command, or pydicom's encoder (None)
VARIANTS: dict[UID, list[str] | None] = {
    JPEGBaseline8Bit: ["dcmcjpeg", "+eb"],  # of an 8-bit copy, see _eight_bit
    JPEGLosslessSV1: ["dcmcjpeg", "+e1"],
    JPEGLossless: ["dcmcjpeg", "+el"],
    JPEGExtended12Bit: ["dcmcjpeg", "+ee", "+un"],
    JPEGLSLossless: ["dcmcjpls", "+el"],
    JPEGLSNearLossless: ["dcmcjpls", "+en", "+un"],
    RLELossless: ["dcmcrle"],
    JPEG2000Lossless: None,
    JPEG2000: None,
    DeflatedExplicitVRLittleEndian: [],  # storescu -xd deflates while sending
    ExplicitVRBigEndian: ["dcmconv", "+tb"],
}


def _variant(phantom: ChestPhantom, syntax: UID, folder: Path) -> tuple[str, list[Path]]:
    """The phantom as a new study in ``syntax``; returns its StudyInstanceUID and files."""
    folder.mkdir()
    study, series = generate_uid(), generate_uid()
    files = []
    for index, source in enumerate(phantom.paths):
        ds = pydicom.dcmread(source)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        # Values fit in 12 bits (HU + 1024), as JPEG Extended needs.
        ds.BitsStored, ds.HighBit = 12, 11
        if syntax == JPEGBaseline8Bit:
            _eight_bit(ds)
        plain = folder / f"plain-{index:03d}.dcm"
        ds.save_as(plain)
        out = folder / f"{index:03d}.dcm"
        command = VARIANTS[syntax]
        if command is None:
            if syntax == JPEG2000:
                ds.compress(syntax, j2k_cr=[8])  # lossy, 8:1
            else:
                ds.compress(syntax)
            ds.save_as(out)
        elif command:
            subprocess.run(
                [require_program(command[0]), *command[1:], str(plain), str(out)],
                check=True,
                capture_output=True,
            )
        else:
            plain.rename(out)
        plain.unlink(missing_ok=True)
        files.append(out)
    expected = ExplicitVRLittleEndian if syntax == DeflatedExplicitVRLittleEndian else syntax
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == expected
    return study, files


def _eight_bit(ds: pydicom.Dataset) -> None:
    """JPEG Baseline holds 8 bits: store HU in steps of 16 (slope 16), as a system that
    keeps CT as 8-bit lossy JPEG would. Not a conformant CT image, but a plugin that
    applies to CT must still get the right volume out of it."""
    stored = ds.pixel_array.astype(np.float32)  # HU + 1024, 0..4095
    ds.PixelData = np.clip(np.round(stored / 16), 0, 255).astype(np.uint8).tobytes()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.RescaleSlope, ds.RescaleIntercept = 16, -1024


def _send_as_they_are(port: int, files: list[Path], syntax: UID) -> None:
    ae = AE(ae_title="SCANNER1")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="INFERGATE")
    assert assoc.is_established
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the files, no re-encoding
    try:
        for path in files:
            assert assoc.send_c_store(path).Status == 0x0000
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before
        assoc.release()


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"))
    pacs.start()
    yield pacs
    pacs.stop()


@pytest.fixture(scope="module")
def infergate(
    tmp_path_factory: pytest.TempPathFactory, orthanc: Orthanc
) -> Iterator[InfergateProcess]:
    root = tmp_path_factory.mktemp("infergate")
    server = InfergateProcess(root / "run", infergate_config(root / "var", orthanc))
    server.workdir.mkdir()
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("syntax", list(VARIANTS), ids=lambda uid: UID(uid).keyword)
def test_series_in_this_transfer_syntax_gets_results(
    syntax: UID,
    infergate: InfergateProcess,
    orthanc: Orthanc,
    small_phantom: ChestPhantom,
    tmp_path: Path,
) -> None:
    study, files = _variant(small_phantom, syntax, tmp_path / "series")
    if syntax in PROPOSE:
        storescu(infergate.port, files, options=(PROPOSE[syntax],))
    else:
        _send_as_they_are(infergate.port, files, syntax)
    sent_before = len([e for e in infergate.events() if e["event"] == "export.sent"])
    infergate.wait_event("export.sent", timeout=120, count=sent_before + 1)

    stored = pydicom.dcmread(
        next(
            p
            for p in (infergate.workdir.parent / "var" / "spool" / "instances").iterdir()
            if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == study
        ),
        stop_before_pixels=True,
    )
    assert stored.file_meta.TransferSyntaxUID == syntax  # kept as received
    assert len(orthanc.find_instances(study, "SEG")) == 1
    (sr_id,) = orthanc.find_instances(study, "SR")
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(orthanc.instance_file(sr_id))
    volumes = _sr_volumes(pydicom.dcmread(sr_path))
    assert volumes["Right lung"] == pytest.approx(small_phantom.right_lung_ml, rel=0.05)
    assert volumes["Left lung"] == pytest.approx(small_phantom.left_lung_ml, rel=0.05)
