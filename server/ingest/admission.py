"""Who may associate: the decision, and the A-ASSOCIATE-RJ that says why not.

A pure function of the request, the settings and the listener's load, so the whole
reject matrix is testable without a network. Result, source and diagnostic values
are those of PS3.8 9.3.4.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergate.config import IngestSettings

PERMANENT, TRANSIENT = 0x01, 0x02
SERVICE_USER, SERVICE_PROVIDER_ACSE, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x02, 0x03
CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x03, 0x07
TEMPORARY_CONGESTION, LOCAL_LIMIT_EXCEEDED = 0x01, 0x02


@dataclass(frozen=True)
class AssociationRequest:
    calling_ae: str
    called_ae: str
    address: str
    tls: bool = False


@dataclass(frozen=True)
class ListenerLoad:
    """What the listener carries while the request is decided (the request excluded)."""

    associations: int
    associations_from_address: int
    free_bytes: int


@dataclass(frozen=True)
class Rejection:
    result: int
    source: int
    diagnostic: int
    reason: str


def space_shortfall(free_bytes: int, settings: IngestSettings) -> str | None:
    """Why the spool is too full to take more, or None while it is not."""
    if free_bytes >= settings.min_free_bytes:
        return None
    return (
        f"spool has {free_bytes} bytes free, below ingest.min_free_bytes"
        f" ({settings.min_free_bytes})"
    )


def _unknown_peer(request: AssociationRequest, settings: IngestSettings) -> str | None:
    """Why ``ingest.peers`` does not admit the requestor, or None when it does."""
    entries = [p for p in settings.peers if p.matches(request.calling_ae, request.address)]
    if any(request.tls or not p.require_tls for p in entries):
        return None
    who = f"calling AE title {request.calling_ae!r} at {request.address}"
    if entries:
        return f"{who} is allowed over DICOM TLS only (require_tls in ingest.peers)"
    known_elsewhere = any(p.ae_title == request.calling_ae for p in settings.peers)
    where = "from this address" if known_elsewhere else "in ingest.peers"
    return f"{who} is not allowed {where}; add it to ingest.peers to allow it"


def decide(
    request: AssociationRequest,
    settings: IngestSettings,
    load: ListenerLoad,
) -> Rejection | None:
    """None to accept ``request``; otherwise the rejection to send and why."""
    if not settings.accept_any_peer:
        refusal = _unknown_peer(request, settings)
        if refusal is not None:
            return Rejection(PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED, refusal)
    titles = settings.called_ae_titles
    if request.called_ae not in titles:
        return Rejection(
            PERMANENT,
            SERVICE_USER,
            CALLED_AE_NOT_RECOGNISED,
            f"called AE title {request.called_ae!r} is not one of {sorted(titles)}",
        )
    shortfall = space_shortfall(load.free_bytes, settings)
    if shortfall is not None:
        return Rejection(TRANSIENT, SERVICE_PROVIDER_PRESENTATION, TEMPORARY_CONGESTION, shortfall)
    if load.associations >= settings.max_associations:
        return Rejection(
            TRANSIENT,
            SERVICE_PROVIDER_PRESENTATION,
            LOCAL_LIMIT_EXCEEDED,
            f"{load.associations} associations open, ingest.max_associations is"
            f" {settings.max_associations}",
        )
    if load.associations_from_address >= settings.max_associations_per_address:
        return Rejection(
            TRANSIENT,
            SERVICE_PROVIDER_PRESENTATION,
            LOCAL_LIMIT_EXCEEDED,
            f"{load.associations_from_address} associations open from {request.address},"
            f" ingest.max_associations_per_address is {settings.max_associations_per_address}",
        )
    return None
