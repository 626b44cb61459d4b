"""Declarative routing rules: conditions on a series, combined with all / any / not.

A rule names the plugins it sends a series to and a priority. Its condition is a
mapping of tests; a mapping matches when every test in it matches, and ``all``,
``any`` and ``not`` nest further mappings. Evaluating a condition gives, besides the
verdict, one line per test saying what was compared and how it came out: that is
what ``infergate route explain`` prints and what routing logs.

    - name: head-ct-bleed
      plugins: [ct_head_bleed]
      priority: urgent
      when:
        modality: [CT]
        body_part: [HEAD, BRAIN]
        not: {series_description: "(?i)localizer|scout"}
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from infergate.routing.facts import SeriesFacts
from infergate.work.states import Priority

Orientation = Literal["axial", "coronal", "sagittal", "oblique", "projection"]


class Range(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    min: float | None = None
    max: float | None = None

    def holds(self, value: float) -> bool:
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        low = "" if self.min is None else f">= {self.min:g}"
        high = "" if self.max is None else f"<= {self.max:g}"
        return " and ".join(part for part in (low, high) if part) or "any"


class Condition(BaseModel):
    """Tests on a series; all that are given must hold."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    modality: tuple[str, ...] | None = None
    sop_class: tuple[str, ...] | None = None
    body_part: tuple[str, ...] | None = None
    series_description: str | None = None  # a regular expression, searched
    image_type: tuple[str, ...] | None = None  # every value listed must be present
    orientation: tuple[Orientation, ...] | None = None
    slices: Range | None = None
    slice_thickness_mm: Range | None = None
    regular_spacing: bool | None = None
    calling_ae: tuple[str, ...] | None = None
    called_ae: tuple[str, ...] | None = None
    all: tuple[Condition, ...] | None = None
    any: tuple[Condition, ...] | None = None
    not_: Condition | None = Field(default=None, alias="not")

    @field_validator("series_description")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from exc
        return value


class Rule(BaseModel):
    """Send the series that match ``when`` to ``plugins``, with ``priority``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    plugins: tuple[str, ...] = Field(min_length=1)
    priority: Priority = "normal"
    when: Condition = Condition()


@dataclass(frozen=True)
class Verdict:
    matched: bool
    lines: tuple[str, ...]  # one per test, indented by nesting


def evaluate(condition: Condition, facts: SeriesFacts, depth: int = 0) -> Verdict:
    """Whether ``facts`` satisfy ``condition``, with the outcome of every test. An empty
    condition matches every series."""
    pad = "  " * depth
    lines: list[str] = []
    matched = True
    for test in _TESTS:
        outcome = test(condition, facts)
        if outcome is not None:
            held, text = outcome
            matched = matched and held
            lines.append(f"{pad}{_mark(held)} {text}")
    for keyword, parts in (("all", condition.all), ("any", condition.any)):
        if parts is None:
            continue
        verdicts = [evaluate(part, facts, depth + 1) for part in parts]
        outcomes = [v.matched for v in verdicts]
        held = all(outcomes) if keyword == "all" else any(outcomes)
        matched = matched and held
        lines.append(f"{pad}{_mark(held)} {keyword} of:")
        lines.extend(line for v in verdicts for line in v.lines)
    if condition.not_ is not None:
        inner = evaluate(condition.not_, facts, depth + 1)
        matched = matched and not inner.matched
        lines.append(f"{pad}{_mark(not inner.matched)} not:")
        lines.extend(inner.lines)
    return Verdict(matched, tuple(lines))


def _mark(ok: bool) -> str:
    return "pass" if ok else "FAIL"


def _one_of(name: str, value: str, allowed: tuple[str, ...] | None) -> tuple[bool, str] | None:
    if allowed is None:
        return None
    wanted = {a.upper() for a in allowed}
    held = value.upper() in wanted
    return held, f"{name} {value or '(none)'} {'in' if held else 'not in'} {sorted(wanted)}"


def _modality(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    return _one_of("modality", f.modality, c.modality)


def _sop_class(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    return _one_of("SOP class", f.sop_class_uid, c.sop_class)


def _body_part(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    return _one_of("body part", f.body_part, c.body_part)


def _calling(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    return _one_of("calling AE title", f.calling_ae, c.calling_ae)


def _called(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    return _one_of("called AE title", f.called_ae, c.called_ae)


def _description(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    if c.series_description is None:
        return None
    held = re.search(c.series_description, f.series_description) is not None
    verb = "matches" if held else "does not match"
    return held, f"series description {f.series_description!r} {verb} {c.series_description!r}"


def _image_type(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    if c.image_type is None:
        return None
    have = {v.upper() for v in f.image_type}
    missing = [v for v in c.image_type if v.upper() not in have]
    text = "\\".join(f.image_type) or "(none)"
    if missing:
        return False, f"image type {text} lacks {missing}"
    return True, f"image type {text} has {list(c.image_type)}"


def _orientation(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    if c.orientation is None:
        return None
    held = f.orientation in c.orientation
    return held, f"orientation {f.orientation} {'in' if held else 'not in'} {list(c.orientation)}"


def _slices(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    if c.slices is None:
        return None
    held = c.slices.holds(f.slices)
    return held, f"{f.slices} slices {'is' if held else 'is not'} {c.slices}"


def _thickness(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    if c.slice_thickness_mm is None:
        return None
    if f.slice_thickness_mm is None:
        return False, "slice thickness unknown"
    held = c.slice_thickness_mm.holds(f.slice_thickness_mm)
    verb = "is" if held else "is not"
    return held, f"slice thickness {f.slice_thickness_mm:g} mm {verb} {c.slice_thickness_mm}"


def _spacing(c: Condition, f: SeriesFacts) -> tuple[bool, str] | None:
    if c.regular_spacing is None:
        return None
    held = f.regular_spacing == c.regular_spacing
    return held, f"slice spacing {'regular' if f.regular_spacing else 'irregular'}"


_TESTS = (
    _modality,
    _sop_class,
    _body_part,
    _description,
    _image_type,
    _orientation,
    _slices,
    _thickness,
    _spacing,
    _calling,
    _called,
)
