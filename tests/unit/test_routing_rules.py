"""Routing rules: conditions on the facts of real and synthetic series, and their explanations."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml

from infergate.cli import main
from infergate.config import Settings, load_settings
from infergate.dicom.geometry import orientation_of
from infergate.errors import ConfigError
from infergate.plugins import LoadedPlugin, check_plugin_names
from infergate.routing.decide import route
from infergate.routing.facts import SeriesFacts, read_series_facts, series_facts
from infergate.routing.rules import Condition, Rule, evaluate
from infergate.testing import ChestPhantom
from infergate_plugins.ct_lung import plugin as ct_lung

PLUGINS = [LoadedPlugin(ct_lung, "test")]


@pytest.fixture(scope="module")
def head(head_ct: list[Path]) -> SeriesFacts:
    """The real tilted head CT, as sent by SCANNER1 to INFERGATE."""
    return read_series_facts(head_ct, "SCANNER1", "INFERGATE")


def test_facts_of_the_real_head_ct(head: SeriesFacts) -> None:
    assert (head.modality, head.body_part, head.orientation) == ("CT", "HEAD", "axial")
    assert (head.slices, head.slice_thickness_mm, head.regular_spacing) == (28, 4.0, True)
    assert "AXIAL" in head.image_type


@pytest.mark.parametrize(
    ("when", "matched"),
    [
        ({"modality": ["CT"]}, True),
        ({"modality": ["MR", "PT"]}, False),
        ({"body_part": ["head", "brain"]}, True),  # case does not matter
        ({"body_part": ["CHEST"]}, False),
        ({"series_description": "(?i)lung"}, False),  # the real one has none
        ({"image_type": ["ORIGINAL", "AXIAL"]}, True),
        ({"image_type": ["DERIVED"]}, False),
        ({"orientation": ["axial"]}, True),
        ({"orientation": ["sagittal", "coronal"]}, False),
        ({"slices": {"min": 20, "max": 400}}, True),
        ({"slices": {"min": 100}}, False),
        ({"slice_thickness_mm": {"max": 5}}, True),
        ({"slice_thickness_mm": {"max": 1.5}}, False),
        ({"regular_spacing": True}, True),
        ({"calling_ae": ["SCANNER1"], "called_ae": ["INFERGATE"]}, True),
        ({"calling_ae": ["PACS"]}, False),
        ({"sop_class": ["1.2.840.10008.5.1.4.1.1.2"]}, True),
        ({"any": [{"modality": ["MR"]}, {"body_part": ["HEAD"]}]}, True),
        ({"all": [{"modality": ["CT"]}, {"body_part": ["CHEST"]}]}, False),
        ({"not": {"body_part": ["HEAD"]}}, False),
        ({"modality": ["CT"], "not": {"series_description": "(?i)scout|localizer"}}, True),
        ({}, True),  # an empty condition matches every series
    ],
)
def test_each_condition_on_the_real_head_ct(
    head: SeriesFacts, when: dict[str, Any], matched: bool
) -> None:
    verdict = evaluate(Condition.model_validate(when), head)
    assert verdict.matched is matched
    assert all(line.strip().startswith(("pass", "FAIL")) for line in verdict.lines)


def test_the_explanation_names_what_failed(head: SeriesFacts) -> None:
    condition = Condition.model_validate(
        {"modality": ["CT"], "any": [{"body_part": ["CHEST"]}, {"slices": {"min": 100}}]}
    )
    verdict = evaluate(condition, head)
    assert not verdict.matched
    assert verdict.lines == (
        "pass modality CT in ['CT']",
        "FAIL any of:",
        "  FAIL body part HEAD not in ['CHEST']",
        "  FAIL 28 slices is not >= 100",
    )


def test_a_rule_overrides_the_plugins_default_and_gives_the_priority(head: SeriesFacts) -> None:
    [by_default] = route(head, PLUGINS)
    assert not by_default.matched  # ct_lung's own rule: chest CT
    chest_only = Rule(
        name="chest", plugins=("ct_lung",), when=Condition(body_part=("CHEST", "LUNG"))
    )
    [decision] = route(head, PLUGINS, (chest_only,))
    assert not decision.matched
    assert decision.explanation == (("chest", ("FAIL body part HEAD not in ['CHEST', 'LUNG']",)),)
    urgent = Rule(name="any ct", plugins=("ct_lung",), priority="urgent", when=Condition())
    [decision] = route(head, PLUGINS, (chest_only, urgent))
    assert (decision.matched, decision.rule, decision.priority) == (True, "any ct", "urgent")


def test_orientation_and_spacing_of_reformatted_and_gappy_series(
    small_phantom: ChestPhantom,
) -> None:
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in small_phantom.paths]
    assert series_facts(headers).regular_spacing
    assert not series_facts(headers[:5] + headers[6:]).regular_spacing  # one slice missing
    one = headers[0]
    for cosines, plane in (
        ([0, 1, 0, 0, 0, -1], "sagittal"),
        ([1, 0, 0, 0, 0, -1], "coronal"),
        ([1, 0, 0, 0, 0.7071, 0.7071], "oblique"),
    ):
        one.ImageOrientationPatient = cosines
        assert orientation_of(one) == plane


def _settings_with(rules: list[dict[str, Any]], tmp_path: Path) -> Settings:
    path = tmp_path / "infergate.yaml"
    path.write_text(yaml.safe_dump({"routing": {"rules": rules}}))
    return load_settings(path)


def test_rules_come_from_the_config_file(tmp_path: Path) -> None:
    settings = _settings_with(
        [
            {
                "name": "head",
                "plugins": ["ct_lung"],
                "priority": "urgent",
                "when": {"modality": ["CT"], "not": {"series_description": "scout"}},
            }
        ],
        tmp_path,
    )
    [rule] = settings.routing.rules
    assert rule.when.not_ == Condition(series_description="scout")
    check_plugin_names(settings, PLUGINS)
    with pytest.raises(ConfigError, match="not a regular expression"):
        _settings_with(
            [{"name": "x", "plugins": ["ct_lung"], "when": {"series_description": "("}}], tmp_path
        )
    with pytest.raises(ConfigError, match="unknown key"):
        _settings_with([{"name": "x", "plugins": ["ct_lung"], "when": {"colour": "red"}}], tmp_path)
    unknown = _settings_with([{"name": "x", "plugins": ["ct_brain"]}], tmp_path)
    with pytest.raises(ConfigError, match=r"routing\.rules: x names plugin"):
        check_plugin_names(unknown, PLUGINS)


def test_route_explain_prints_every_series_and_every_test(
    head_ct: list[Path],
    small_phantom: ChestPhantom,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    folder = tmp_path / "mixed"
    folder.mkdir()
    for path in [*head_ct, *small_phantom.paths]:
        (folder / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("not DICOM")
    config = tmp_path / "infergate.yaml"
    config.write_text(
        "plugins:\n  enabled: [ct_lung]\n"
        "routing:\n  rules:\n    - name: chest\n      plugins: [ct_lung]\n"
        "      when: {body_part: [CHEST]}\n"
    )
    assert main(["route", "explain", str(folder), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("series ") for line in out.splitlines()) == 2
    assert "ct_lung: does not run (no rule matched (chest))" in out
    assert "FAIL body part HEAD not in ['CHEST']" in out
    assert "1 file(s) skipped" in out
    assert "no plugin runs: ignored (routing.unmatched.action: ignore), logged" in out
    config.write_text(
        config.read_text() + "  unmatched:\n    action: forward\n"
        "    destination: {ae_title: ARCHIVE, host: 10.1.1.1, port: 104}\n"
    )
    assert main(["route", "explain", str(folder), "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "no plugin runs: forwarded as received to ARCHIVE at 10.1.1.1:104" in out
    assert "PatientName" not in out
    patient = str(pydicom.dcmread(head_ct[0], stop_before_pixels=True).get("PatientName", ""))
    if patient:
        assert patient not in out


def test_facts_do_not_depend_on_file_order(small_phantom: ChestPhantom) -> None:
    forward = read_series_facts(small_phantom.paths)
    backward = read_series_facts(list(reversed(small_phantom.paths)))
    assert forward == backward
