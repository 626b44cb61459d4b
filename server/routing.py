"""Routing: which plugins a completed series goes to, and why.

A pure function of the series' headers and the loaded plugins; no I/O. This first
version routes by modality; declarative rules will take its place behind the same
signature.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergate.plugins import LoadedPlugin


@dataclass(frozen=True)
class SeriesHeader:
    """What routing may look at (no patient data)."""

    modality: str
    calling_ae: str
    called_ae: str
    instance_count: int


@dataclass(frozen=True)
class Decision:
    """One plugin's verdict on a series, with the reason in words."""

    plugin: str
    matched: bool
    reason: str


def route(series: SeriesHeader, plugins: list[LoadedPlugin]) -> list[Decision]:
    """Decide, for every plugin, whether it runs on ``series``."""
    decisions = []
    for loaded in plugins:
        spec = loaded.spec
        accepted = sorted(spec.modalities)
        if series.modality in spec.modalities:
            decisions.append(Decision(spec.name, True, f"modality {series.modality} in {accepted}"))
        else:
            decisions.append(
                Decision(spec.name, False, f"modality {series.modality} not in {accepted}")
            )
    return decisions
