"""Ingest's metrics, counted where ingest runs: in the listener processes.

Each listener process writes its values to files of its own in the gateway's metrics
folder (prometheus-client's multiprocess mode: the listener pool starts them with
``PROMETHEUS_MULTIPROC_DIR`` set); the gateway's ``/metrics`` adds them up
(``MultiProcessCollector``). Anywhere else (a listener started in a test's own
process) the same calls count in memory, in no registry. Labels are outcomes, DICOM
reject reasons and statuses: nothing a peer's data chooses.
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import Counter, Histogram
from pynetdicom.pdu_primitives import A_ASSOCIATE

# Where the listener processes write, under the var folder.
MULTIPROCESS_ENV = "PROMETHEUS_MULTIPROC_DIR"

INSTANCES_RECEIVED = Counter(
    "infergate_instances_received",
    "Instances received and acknowledged with success (duplicates included).",
    registry=None,
)
BYTES_RECEIVED = Counter(
    "infergate_received_bytes",
    "Bytes of the instances received and acknowledged.",
    registry=None,
)
INSTANCES_REFUSED = Counter(
    "infergate_instances_refused",
    "C-STORE requests answered with a failure, by the status returned (0xA700, ...).",
    ["status"],
    registry=None,
)
ASSOCIATIONS = Counter(
    "infergate_associations",
    "Associations by outcome: accepted or rejected when requested (reason: the"
    " A-ASSOCIATE-RJ's, or 'TLS handshake'), released or aborted when they end.",
    ["outcome", "reason"],
    registry=None,
)
STORE_COMMIT_SECONDS = Histogram(
    "infergate_store_commit_seconds",
    "How long one group commit of received instances took: the files moved into the"
    " spool and their rows committed (fsyncs included).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=None,
)


def rejection_reason(source: int, diagnostic: int) -> str:
    """An A-ASSOCIATE-RJ's reason in the standard's words, from pynetdicom's table."""
    primitive = A_ASSOCIATE()
    primitive.result_source = source
    primitive.diagnostic = diagnostic
    return primitive.reason_str


def prepare_folder(folder: Path) -> None:
    """An empty folder for a new gateway's listener processes: counts start at zero
    with the gateway, as every other counter of its does."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()


def child_environment(folder: Path) -> dict[str, str]:
    return {**os.environ, MULTIPROCESS_ENV: str(folder)}
