"""Routing: which plugins a completed series goes to, at which priority, and why.

A pure function of the series' facts (``routing.facts``), the installed plugins, the
rules of ``routing.rules`` and the plugins enabled for the called AE title the
series was sent to. A plugin that no configured rule names runs under its default
rule (the modalities it declares); a plugin that rules name runs where one of them
matches, the first that does giving the priority.
"""

from __future__ import annotations

from dataclasses import dataclass

from infergate.plugin_api import ACQUIRED_IMAGES
from infergate.plugins import LoadedPlugin
from infergate.routing.facts import SeriesFacts
from infergate.routing.rules import Condition, Rule, evaluate
from infergate.work.states import Priority


@dataclass(frozen=True)
class Decision:
    """One plugin's verdict on a series, with the reason in words."""

    plugin: str
    matched: bool
    reason: str
    priority: Priority = "normal"
    rule: str | None = None
    # Every rule tried for the plugin: its name, and one line per test.
    explanation: tuple[tuple[str, tuple[str, ...]], ...] = ()


# What a plugin that ships no rule runs on: acquired images of its modalities.
ACQUIRED = Condition.model_validate(ACQUIRED_IMAGES)


def default_rule(loaded: LoadedPlugin) -> Rule:
    """The rule a plugin runs under when no configured rule names it: the one its spec
    ships, or else acquired images of its modalities (``plugin_api.ACQUIRED_IMAGES``)."""
    spec = loaded.spec
    when = (
        Condition(modality=tuple(sorted(spec.modalities)), all=(ACQUIRED,))
        if spec.rule is None
        else Condition.model_validate(spec.rule)
    )
    return Rule(
        name=f"{spec.name} (default)", plugins=(spec.name,), priority=spec.priority, when=when
    )


def route(
    facts: SeriesFacts,
    plugins: list[LoadedPlugin],
    rules: tuple[Rule, ...] = (),
    enabled: frozenset[str] | None = None,
) -> list[Decision]:
    """Decide, for every plugin, whether it runs on the series and at which priority;
    ``enabled`` (None: all) are the plugins of the called AE title it was sent to."""
    decisions = []
    for loaded in plugins:
        name = loaded.spec.name
        if enabled is not None and name not in enabled:
            reason = f"not enabled for called AE title {facts.called_ae} (ingest.called_aes)"
            decisions.append(Decision(name, False, reason))
            continue
        candidates = [r for r in rules if name in r.plugins] or [default_rule(loaded)]
        tried: list[tuple[str, tuple[str, ...]]] = []
        chosen: Rule | None = None
        for rule in candidates:
            verdict = evaluate(rule.when, facts)
            tried.append((rule.name, verdict.lines))
            if verdict.matched:
                chosen = rule
                break
        if chosen is None:
            names = ", ".join(r.name for r in candidates)
            decisions.append(
                Decision(name, False, f"no rule matched ({names})", explanation=tuple(tried))
            )
        else:
            decisions.append(
                Decision(
                    name,
                    True,
                    f"rule {chosen.name} matched",
                    priority=chosen.priority,
                    rule=chosen.name,
                    explanation=tuple(tried),
                )
            )
    return decisions
