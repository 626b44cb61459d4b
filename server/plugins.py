"""Plugin discovery through the ``infergate.plugins`` entry-point group, checked at start."""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from pydantic import ValidationError

from infergate.config import Settings
from infergate.errors import ConfigError, ModelMismatchError, PluginError
from infergate.logs import get_logger
from infergate.plugin_api import API_VERSION, Plugin, PluginSpec
from infergate.routing.rules import Condition

if TYPE_CHECKING:
    from infergate.inference.triton import TritonClient

GROUP = "infergate.plugins"
# Plugin names appear in config, job records and logs.
_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")

log = get_logger(__name__)


@dataclass(frozen=True)
class LoadedPlugin:
    """A plugin object and where it came from."""

    plugin: Plugin
    source: str

    @property
    def spec(self) -> PluginSpec:
        return self.plugin.spec


def validate(plugin: object, source: str) -> Plugin:
    """Raise :class:`PluginError` unless ``plugin`` implements the contract consistently."""
    if not isinstance(plugin, Plugin):
        raise PluginError(
            f"{source} is not an Infergate plugin (needs spec, preprocess, postprocess)"
        )
    spec = plugin.spec
    if not isinstance(spec, PluginSpec):
        raise PluginError(f"{source}: spec must be an infergate.plugin_api.PluginSpec")
    if spec.api_version != API_VERSION:
        raise PluginError(
            f"plugin {spec.name} targets plugin API {spec.api_version};"
            f" this Infergate has {API_VERSION}"
        )
    if not _NAME.fullmatch(spec.name):
        raise PluginError(
            f"{source}: plugin name {spec.name!r} must be lowercase letters, digits and _"
            " starting with a letter"
        )
    if not spec.modalities:
        raise PluginError(f"plugin {spec.name} accepts no modality")
    if spec.rule is not None:
        try:
            Condition.model_validate(spec.rule)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise PluginError(f"plugin {spec.name} ships an invalid rule: {problems}") from exc
    numbers = [s.number for s in spec.segments]
    if len(set(numbers)) != len(numbers) or any(not 0 < n < 256 for n in numbers):
        raise PluginError(f"plugin {spec.name}: segment numbers must be unique and in 1..255")
    if spec.slice_chunk is not None and spec.slice_chunk < 1:
        raise PluginError(f"plugin {spec.name}: slice_chunk must be at least 1 slice")
    if spec.deadline_s is not None and spec.deadline_s <= 0:
        raise PluginError(f"plugin {spec.name}: deadline_s must be positive")
    inputs = {t.name for t in spec.inputs}
    for tensor in spec.outputs:
        if tensor.shape_of is not None and tensor.shape_of not in inputs:
            raise PluginError(
                f"plugin {spec.name}: output {tensor.name} has the shape of"
                f" '{tensor.shape_of}', which is none of its inputs {sorted(inputs)}"
            )
    return plugin


def discover() -> list[LoadedPlugin]:
    """Load and validate every installed plugin; a broken one stops startup."""
    loaded: list[LoadedPlugin] = []
    names: set[str] = set()
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        source = f"entry point '{entry.name}' ({entry.value})"
        try:
            obj = entry.load()
        except Exception as exc:  # a plugin's import can fail in any way
            raise PluginError(f"{source} cannot be imported: {exc}") from exc
        plugin = validate(obj, source)
        if plugin.spec.name in names:
            raise PluginError(f"two installed plugins are named {plugin.spec.name}")
        names.add(plugin.spec.name)
        loaded.append(LoadedPlugin(plugin=plugin, source=source))
    return loaded


def enabled_plugins(settings: Settings, installed: list[LoadedPlugin]) -> list[LoadedPlugin]:
    """The installed plugins that ``plugins.enabled`` lists (if it is not set, all but
    the opt-in ones: ``PluginSpec.opt_in``); one listed but not installed is a
    :class:`ConfigError`, one installed but not enabled is logged as skipped."""
    wanted = settings.plugins.enabled
    if wanted is None:
        for loaded in installed:
            if loaded.spec.opt_in:
                log.info(
                    "plugins.skipped",
                    plugin=loaded.spec.name,
                    reason="opt-in: runs only where plugins.enabled lists it",
                )
        return [p for p in installed if not p.spec.opt_in]
    names = {p.spec.name for p in installed}
    missing = sorted(set(wanted) - names)
    if missing:
        raise ConfigError(
            f"plugins.enabled lists {', '.join(missing)}, not installed"
            f" (installed: {', '.join(sorted(names)) or 'none'})"
        )
    for loaded in installed:
        if loaded.spec.name not in wanted:
            log.info("plugins.skipped", plugin=loaded.spec.name, reason="not in plugins.enabled")
    return [p for p in installed if p.spec.name in wanted]


def check_plugin_names(settings: Settings, plugins: list[LoadedPlugin]) -> None:
    """Raise :class:`ConfigError` if ``ingest.called_aes`` or ``routing.rules`` names a
    plugin that is not among ``plugins`` (installed and enabled)."""
    installed = {p.spec.name for p in plugins}
    listed = ", ".join(sorted(installed)) or "none"
    places = [
        (f"ingest.called_aes: {c.ae_title}", c.plugins or ()) for c in settings.ingest.called_aes
    ]
    places += [(f"routing.rules: {r.name}", r.plugins) for r in settings.routing.rules]
    for where, names in places:
        unknown = sorted(set(names) - installed)
        if unknown:
            raise ConfigError(
                f"{where} names plugin(s) {', '.join(unknown)}, not installed or not enabled"
                f" (enabled: {listed})"
            )


def pickling_error(plugin: object) -> Exception | None:
    """What pickling ``plugin`` raises (each job gets it in a process of its own), or
    None when it pickles."""
    try:
        pickle.dumps(plugin)
    except Exception as exc:  # pickle raises TypeError, AttributeError, PicklingError...
        return exc
    return None


def check_plugins(client: TritonClient, plugins: list[LoadedPlugin]) -> None:
    """Check every plugin against its live model; every mismatch is named before the
    :class:`ModelMismatchError` that stops startup."""
    problems = []
    for loaded in plugins:
        try:
            client.check_plugin(loaded.spec)
        except ModelMismatchError as exc:
            log.error("check.plugin.failed", plugin=loaded.spec.name, reason=str(exc))
            problems.append(str(exc))
            continue
        log.info(
            "check.plugin.ok",
            plugin=loaded.spec.name,
            version=loaded.spec.version,
            model=loaded.spec.model_name,
        )
    if problems:
        raise ModelMismatchError("; ".join(problems))
