"""Every installed plugin passes the conformance check; broken ones are caught by it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from infergate.plugin_api import Findings, Measurement, PluginSpec, Series
from infergate.plugins import LoadedPlugin, discover
from infergate.testing import check_plugin
from infergate_plugins.ct_lung import plugin as ct_lung

INSTALLED = discover()


def test_there_is_a_plugin_to_check() -> None:
    assert "ct_lung" in {p.spec.name for p in INSTALLED}


@pytest.mark.parametrize("loaded", INSTALLED, ids=lambda p: p.spec.name)
def test_installed_plugin_conforms(loaded: LoadedPlugin) -> None:
    assert check_plugin(loaded.plugin) == []


class _Broken:
    """ct_lung with one thing wrong, chosen by ``flaw``."""

    def __init__(self, flaw: str) -> None:
        self.flaw = flaw
        self.spec: PluginSpec = ct_lung.spec

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        inputs = ct_lung.preprocess(series)
        if self.flaw == "dtype":
            inputs["CT_HU"] = inputs["CT_HU"].astype(np.float32)
        if self.flaw == "name":
            inputs["HU"] = inputs.pop("CT_HU")
        if self.flaw == "mutates":
            series.volume[0, 0, 0] = 1234.0
        return inputs

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        findings = ct_lung.postprocess(series, outputs)
        if self.flaw == "segment":
            return replace(findings, segment_numbers=(7,))
        if self.flaw == "shape" and findings.label_map is not None:
            return replace(findings, label_map=findings.label_map[:, :10])
        if self.flaw == "measurement":
            unit = ct_lung.spec.segments[0].type
            return replace(findings, measurements=(Measurement(9, unit, 1.0, unit),))
        if self.flaw == "image":
            unit = ct_lung.spec.segments[0].type
            return replace(findings, measurements=(Measurement(None, unit, 1.0, unit, 8),))
        return findings


@pytest.mark.parametrize(
    ("flaw", "expected"),
    [
        ("dtype", "input CT_HU is float32, declared INT16"),
        ("name", "inputs are ['HU', 'SPACING_MM']"),
        ("mutates", "assignment destination is read-only"),
        ("segment", "findings name segments [7]"),
        ("shape", "label map is uint8 (8, 10, 64)"),
        ("measurement", "a measurement is about segment 9"),
        ("image", "a measurement is about image 8; the series has 8"),
    ],
)
def test_a_broken_plugin_is_caught(flaw: str, expected: str) -> None:
    problems = check_plugin(_Broken(flaw))
    assert any(expected in p for p in problems), problems


def test_what_is_not_a_plugin_is_caught() -> None:
    assert check_plugin(object()) == [
        "the plugin under test is not an Infergate plugin (needs spec, preprocess, postprocess)"
    ]
