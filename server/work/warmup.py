"""Warming up a process for jobs: what the first job would otherwise pay for."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np

from infergate.config import DeviceSettings, ResultsSettings
from infergate.inference.volume import load_series
from infergate.plugin_api import Findings
from infergate.plugins import discover
from infergate.results.identity import ResultIdentity
from infergate.results.writer import encode
from infergate.testing import write_chest_ct


def warm() -> None:
    """Run a tiny job's own steps once, in the forkserver (or in the gateway, for jobs
    on threads), so that no job pays for what the first use of each costs: highdicom
    reading its IOD and module tables (JSON, ~0.35 s), and the modules pydicom and
    highdicom import on first use.
    A 4-slice synthetic CT is read, given a label map of an installed plugin's first
    segment, and encoded as SEG and SR. Best effort: if it fails, jobs pay that cost."""
    with contextlib.suppress(Exception), tempfile.TemporaryDirectory(prefix="ig-warm-") as tmp:
        phantom = write_chest_ct(Path(tmp), slices=4, size=64)
        loaded = load_series(list(phantom.paths))
        specs = [p.spec for p in discover() if p.spec.segments]
        if not specs:
            return
        spec = specs[0]
        number = spec.segments[0].number
        labels = np.zeros(loaded.series.volume.shape, dtype=np.uint8)
        labels[:, 24:40, 24:40] = number
        findings = Findings(label_map=labels, segment_numbers=(number,))
        identity = ResultIdentity(
            job_id="0" * 32,
            uid_root=ResultsSettings().uid_root,
            device=DeviceSettings(),
            seg_series_number=1,
            sr_series_number=2,
        )
        encode(loaded, findings, spec, identity)
