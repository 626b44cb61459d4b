from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import replace

import numpy as np
import numpy.typing as npt
import pytest
import structlog

from infergate.config import Settings
from infergate.errors import ConfigError, PluginError
from infergate.plugin_api import Findings, PluginSpec, Series
from infergate.plugins import LoadedPlugin, check_plugin_names, discover, enabled_plugins, validate
from infergate.routing.decide import route
from infergate.routing.facts import SeriesFacts
from infergate_plugins.ct_head_bleed import plugin as ct_head_bleed
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
    loaded = {p.spec.name: p for p in discover()}
    assert sorted(loaded) == ["ct_head_bleed", "ct_lung", "ct_lung_unet", "cxr_quality"]
    assert loaded["ct_lung"].plugin is ct_lung
    for name, found in loaded.items():
        assert f"infergate_plugins.{name}:plugin" in found.source


def test_a_triage_plugin_runs_urgent_on_head_cts_only() -> None:
    plugins = [LoadedPlugin(ct_head_bleed, "test")]
    head = SeriesFacts("CT", "", "HEAD", "", ACQUIRED, "axial", 30, 5.0, True, "SCANNER", "AI")
    [decision] = route(head, plugins)
    assert (decision.matched, decision.priority) == (True, "urgent")
    described = SeriesFacts("CT", "", "", "Routine Brain 5mm", ACQUIRED, "axial", 30, 5.0, True)
    assert route(described, plugins)[0].matched
    assert not route(_facts("CT"), plugins)[0].matched
    scout = SeriesFacts("CT", "", "HEAD", "", ("ORIGINAL", "LOCALIZER"), "axial", 1, 1.0, True)
    assert not route(scout, plugins)[0].matched
    # A scanner's dose screen in the head study: derived, secondary.
    dose = SeriesFacts("CT", "", "HEAD", "Exam Summary", DOSE_SCREEN, "unknown", 1, None, True)
    assert not route(dose, plugins)[0].matched


ACQUIRED = ("ORIGINAL", "PRIMARY", "AXIAL")
DOSE_SCREEN = ("DERIVED", "SECONDARY", "SCREEN SAVE")


def _facts(
    modality: str, body_part: str = "", image_type: tuple[str, ...] = ACQUIRED
) -> SeriesFacts:
    return SeriesFacts(
        modality, "", body_part, "", image_type, "axial", 100, 1.0, True, "SCANNER", "AI"
    )


class _NoRule:
    """ct_lung as a plugin that ships no rule of its own."""

    spec = replace(ct_lung.spec, rule=None)
    preprocess = staticmethod(ct_lung.preprocess)
    postprocess = staticmethod(ct_lung.postprocess)


def test_a_plugin_without_a_rule_runs_on_acquired_images_of_its_modalities() -> None:
    plugins = [LoadedPlugin(_NoRule(), "test")]
    [ct] = route(_facts("CT"), plugins)
    assert (ct.plugin, ct.matched, ct.rule, ct.priority) == (
        "ct_lung",
        True,
        "ct_lung (default)",
        "normal",
    )
    ((name, lines),) = ct.explanation
    assert name == "ct_lung (default)"
    assert lines[:4] == (
        "pass modality CT in ['CT']",
        "pass all of:",
        "  pass image type ORIGINAL\\PRIMARY\\AXIAL has ['PRIMARY']",
        "  pass not:",
    )
    assert "      FAIL image type ORIGINAL\\PRIMARY\\AXIAL lacks ['SECONDARY']" in lines
    [mr] = route(_facts("MR"), plugins)
    assert (mr.plugin, mr.matched) == ("ct_lung", False)
    assert "no rule matched" in mr.reason
    assert mr.explanation[0][1][0] == "FAIL modality MR not in ['CT']"
    [dose] = route(_facts("CT", image_type=DOSE_SCREEN), plugins)
    assert not dose.matched
    [scout] = route(_facts("CT", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), plugins)
    assert not scout.matched
    # Lossy compression marks an acquired image DERIVED (dcmcjpeg does); still acquired.
    [lossy] = route(_facts("CT", image_type=("DERIVED", "PRIMARY", "AXIAL")), plugins)
    assert lossy.matched
    [mpr] = route(_facts("CT", image_type=("DERIVED", "PRIMARY", "MPR")), plugins)
    assert not mpr.matched


def test_ct_lung_runs_on_acquired_axial_chest_ct_and_says_why_not_on_a_head() -> None:
    plugins = [LoadedPlugin(ct_lung, "test")]
    [chest] = route(_facts("CT", "CHEST"), plugins)
    assert (chest.matched, chest.rule) == (True, "ct_lung (default)")
    described = replace(_facts("CT"), series_description="Thorax routine 1.25mm")
    assert route(described, plugins)[0].matched
    [head] = route(_facts("CT", "HEAD"), plugins)
    assert not head.matched
    lines = head.explanation[0][1]
    assert "  FAIL body part HEAD not in" in " ".join(lines)
    [dose] = route(_facts("CT", "CHEST", DOSE_SCREEN), plugins)
    assert not dose.matched
    reformat = replace(_facts("CT", "CHEST"), orientation="coronal")
    assert not route(reformat, plugins)[0].matched


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
    with pytest.raises(PluginError, match="slice_chunk must be at least 1"):
        validate(_Plugin(replace(ct_lung.spec, slice_chunk=0)), "test")
    with pytest.raises(PluginError, match="deadline_s must be positive"):
        validate(_Plugin(replace(ct_lung.spec, deadline_s=0.0)), "test")
    unknown = (replace(ct_lung.spec.outputs[0], shape_of="VOLUME"),)
    with pytest.raises(PluginError, match="shape of 'VOLUME', which is none of its inputs"):
        validate(_Plugin(replace(ct_lung.spec, outputs=unknown)), "test")
    for name in ("(forward)", "CT Lung", "", "9lives"):
        with pytest.raises(PluginError, match="must be lowercase letters"):
            validate(_Plugin(replace(ct_lung.spec, name=name)), "test")


def test_the_default_rule_a_plugin_ships_keeps_scouts_out() -> None:
    plugins = [LoadedPlugin(ct_lung, "test")]
    scout = dataclasses.replace(_facts("CT"), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    [decision] = route(scout, plugins)
    assert not decision.matched
    assert (
        "    pass image type ORIGINAL\\PRIMARY\\LOCALIZER has ['LOCALIZER']"
        in (decision.explanation[0][1])
    )
    topogram = dataclasses.replace(_facts("CT"), series_description="Topogram 0.6 T20f")
    assert not route(topogram, plugins)[0].matched


def test_a_plugin_whose_rule_is_not_a_rule_is_refused() -> None:
    broken = replace(ct_lung.spec, rule={"modality": ["CT"], "colour": "red"})
    with pytest.raises(PluginError, match="invalid rule: colour"):
        validate(_Plugin(broken), "test")


def test_plugins_enabled_selects_and_logs_what_it_skips() -> None:
    installed = [LoadedPlugin(ct_lung, "test"), LoadedPlugin(_Plugin(_other_spec()), "test")]
    assert enabled_plugins(Settings(), installed) == installed  # not set: all of them
    settings = Settings.model_validate({"plugins": {"enabled": ["ct_lung"]}})
    with structlog.testing.capture_logs() as logs:
        assert [p.spec.name for p in enabled_plugins(settings, installed)] == ["ct_lung"]
    assert [(e["event"], e["plugin"]) for e in logs] == [("plugins.skipped", "mr_other")]
    with pytest.raises(ConfigError, match=r"plugins\.enabled lists ct_brain, not installed"):
        enabled_plugins(
            Settings.model_validate({"plugins": {"enabled": ["ct_lung", "ct_brain"]}}), installed
        )
    routed = Settings.model_validate(
        {
            "plugins": {"enabled": ["ct_lung"]},
            "routing": {"rules": [{"name": "mr", "plugins": ["mr_other"]}]},
        }
    )
    with pytest.raises(ConfigError, match="not installed or not enabled"):
        check_plugin_names(routed, enabled_plugins(routed, installed))


def _other_spec() -> PluginSpec:
    return replace(ct_lung.spec, name="mr_other", modalities=frozenset({"MR"}), rule=None)
