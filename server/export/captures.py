"""A SEG for a destination that does not store Segmentation: the same segments drawn on
the source slices (``results.capture``), put into the delivery in its place.

Which destinations: ``segmentation: secondary_capture`` always; ``auto`` (the
default) when its association did not accept the SEG's SOP class. The images are
written beside the SEG and recorded as results of its job (durable before they are
sent), their UIDs derived from the SEG's, so a crash before the delivery is recorded
makes the same images again, and each is sent once.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import structlog
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from infergate.config import Settings
from infergate.durable import fsync_dir
from infergate.errors import InfergateError
from infergate.results.capture import secondary_captures
from infergate.results.writer import write_dataset
from infergate.store import Store
from infergate.store.rows import DeliveryItem, DeliveryRow, ResultRow
from infergate.work.states import ResultKind, ResultState

log = structlog.get_logger(__name__)


def _lookup(paths: list[Path]) -> dict[str, Path]:
    found = {}
    for path in paths:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True)
        except (OSError, InvalidDicomError):
            continue  # retention removed it, or it is not readable: not a source then
        found[str(header.SOPInstanceUID)] = path
    return found


def _write(directory: Path, images: list[Dataset]) -> list[Path]:
    """Each image durably, named by its number (no DICOM data in a file name)."""
    paths = [
        write_dataset(directory, f"sc-{n:04d}", image, sync_dir=False)
        for n, image in enumerate(images, start=1)
    ]
    fsync_dir(directory)
    return paths


def substitute(
    store: Store, settings: Settings, delivery: DeliveryRow, seg: DeliveryItem, why: str
) -> list[DeliveryItem] | str:
    """Replace ``seg`` in ``delivery`` by Secondary Capture images drawn from it; the
    new pending items, or why there can be none (the SEG then stays as it was)."""
    try:
        job_id, paths = store.result_sources(seg.sop_instance_uid)
        sources = _lookup(paths)

        def find(uid: str, frame: int | None) -> tuple[Dataset, int | None] | None:
            path = sources.get(uid)
            return None if path is None else (pydicom.dcmread(path), frame)

        images = secondary_captures(pydicom.dcmread(seg.path), find, settings.results.uid_root)
        written = _write(seg.path.parent, images)
    except (InfergateError, OSError, InvalidDicomError) as exc:
        reason = f"no Secondary Capture images either: {exc}"
        log.warning("export.captures.failed", sop_instance_uid=seg.sop_instance_uid, reason=reason)
        return reason
    rows = [
        ResultRow(str(image.SOPInstanceUID), job_id, ResultKind.SC, path, seg.priority)
        for image, path in zip(images, written, strict=True)
    ]
    reason = f"{why}: sent as {len(rows)} Secondary Capture images instead"
    store.replace_with_captures(
        delivery.delivery_id, seg.sop_instance_uid, reason, rows, time.time()
    )
    log.info(
        "export.seg.replaced",
        sop_instance_uid=seg.sop_instance_uid,
        destination=delivery.destination.ae_title,
        images=len(rows),
        reason=why,
    )
    return [
        DeliveryItem(
            row.sop_instance_uid, ResultKind.SC, row.path, row.priority, ResultState.PENDING
        )
        for row in rows
    ]
