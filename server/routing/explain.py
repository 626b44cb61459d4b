"""``infergate route explain PATH``: what routing would do with the series in a folder.

Reads the headers of every DICOM file under PATH (pixel data not loaded), groups
them by series, and prints for each series its facts and, for every installed
plugin, whether it would run, at which priority, and the outcome of every test of
every rule tried. Nothing is sent anywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from infergate.config import Settings
from infergate.plugins import LoadedPlugin
from infergate.routing.decide import route
from infergate.routing.facts import SeriesFacts, series_facts


def explain(
    settings: Settings,
    plugins: list[LoadedPlugin],
    target: Path,
    calling_ae: str = "",
    called_ae: str | None = None,
) -> Iterator[str]:
    """The lines ``route explain`` prints for the DICOM files at ``target``."""
    called = called_ae or settings.ingest.ae_title
    enabled = settings.ingest.called_ae(called).plugins
    series, skipped = _read_headers(target)
    if not series:
        yield f"no DICOM series under {target}"
    for uid, headers in series.items():
        facts = series_facts(headers, calling_ae, called)
        yield f"series {uid}"
        yield f"  {_describe(facts)}"
        decisions = route(
            facts, plugins, settings.routing.rules, None if enabled is None else frozenset(enabled)
        )
        for decision in decisions:
            verdict = f"runs, priority {decision.priority}" if decision.matched else "does not run"
            yield f"  {decision.plugin}: {verdict} ({decision.reason})"
            for rule, lines in decision.explanation:
                yield f"    rule {rule}:"
                yield from (f"      {line}" for line in lines)
        if not any(d.matched for d in decisions):
            yield f"  no plugin runs: {_unmatched(settings)}"
    if skipped:
        yield f"{skipped} file(s) skipped: not DICOM, or without a Series Instance UID"


def _unmatched(settings: Settings) -> str:
    policy = settings.routing.unmatched
    if policy.destination is None or policy.action == "ignore":
        return "ignored (routing.unmatched.action: ignore), logged"
    where = policy.destination
    return (
        f"forwarded as received to {where.ae_title} at {where.host}:{where.port}"
        " (routing.unmatched)"
    )


def _read_headers(target: Path) -> tuple[dict[str, list[Dataset]], int]:
    files = [target] if target.is_file() else sorted(p for p in target.rglob("*") if p.is_file())
    series: dict[str, list[Dataset]] = {}
    skipped = 0
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError):
            skipped += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            skipped += 1
            continue
        series.setdefault(uid, []).append(ds)
    return series, skipped


def _describe(facts: SeriesFacts) -> str:
    thickness = "?" if facts.slice_thickness_mm is None else f"{facts.slice_thickness_mm:g}"
    image_type = "\\".join(facts.image_type) or "?"
    return (
        f"{facts.modality or '?'}, {facts.slices} instance(s), {facts.orientation},"
        f" slice thickness {thickness} mm,"
        f" {'regular' if facts.regular_spacing else 'irregular'} spacing,"
        f" body part {facts.body_part or '?'}, description {facts.series_description!r},"
        f" image type {image_type}"
    )
