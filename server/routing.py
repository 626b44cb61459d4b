"""Routing: which plugins a completed series goes to, and why.

A pure function of the series' headers, the loaded plugins and the plugins enabled
for the called AE title the series was sent to; no I/O. This version routes by
modality; declarative rules will take its place behind the same signature.
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


def route(
    series: SeriesHeader, plugins: list[LoadedPlugin], enabled: frozenset[str] | None = None
) -> list[Decision]:
    """Decide, for every plugin, whether it runs on ``series``; ``enabled`` (None: all)
    are the plugins of the called AE title it was sent to."""
    decisions = []
    for loaded in plugins:
        spec = loaded.spec
        accepted = sorted(spec.modalities)
        if enabled is not None and spec.name not in enabled:
            decisions.append(
                Decision(
                    spec.name,
                    False,
                    f"not enabled for called AE title {series.called_ae} (ingest.called_aes)",
                )
            )
        elif series.modality in spec.modalities:
            decisions.append(Decision(spec.name, True, f"modality {series.modality} in {accepted}"))
        else:
            decisions.append(
                Decision(spec.name, False, f"modality {series.modality} not in {accepted}")
            )
    return decisions
