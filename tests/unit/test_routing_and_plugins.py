from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest

from infergate.errors import PluginError
from infergate.plugin_api import Findings, PluginSpec, Series
from infergate.plugins import LoadedPlugin, discover, validate
from infergate.routing import SeriesHeader, route
from infergate_plugins.ct_lung import plugin as ct_lung


class _Plugin:
    def __init__(self, spec: PluginSpec) -> None:
        self.spec = spec

    def preprocess(self, series: Series) -> dict[str, npt.NDArray[np.generic]]:
        return {}

    def postprocess(
        self, series: Series, outputs: Mapping[str, npt.NDArray[np.generic]]
    ) -> Findings:
        return Findings()


def test_in_repo_plugins_are_found_through_entry_points() -> None:
    loaded = discover()
    assert [p.spec.name for p in loaded] == ["ct_lung"]
    assert loaded[0].plugin is ct_lung
    assert "infergate_plugins.ct_lung:plugin" in loaded[0].source


def test_routing_by_modality_explains_itself() -> None:
    plugins = [LoadedPlugin(ct_lung, "test")]
    ct = route(SeriesHeader("CT", "SCANNER", "INFERGATE", 100), plugins)
    assert [(d.plugin, d.matched) for d in ct] == [("ct_lung", True)]
    assert "CT" in ct[0].reason
    mr = route(SeriesHeader("MR", "SCANNER", "INFERGATE", 100), plugins)
    assert [(d.plugin, d.matched) for d in mr] == [("ct_lung", False)]
    assert "MR not in" in mr[0].reason


def test_validation_refuses_broken_plugins() -> None:
    with pytest.raises(PluginError, match="not an Infergate plugin"):
        validate(object(), "test")
    with pytest.raises(PluginError, match="accepts no modality"):
        validate(_Plugin(replace(ct_lung.spec, modalities=frozenset())), "test")
    with pytest.raises(PluginError, match="plugin API"):
        validate(_Plugin(replace(ct_lung.spec, api_version=99)), "test")
    doubled = ct_lung.spec.segments + ct_lung.spec.segments[:1]
    with pytest.raises(PluginError, match="unique"):
        validate(_Plugin(replace(ct_lung.spec, segments=doubled)), "test")
