"""ct_head_bleed: head CT triage, candidate intracranial hyperdensities (urgent when found)."""

from infergate_plugins.ct_head_bleed.plugin import CtHeadBleedPlugin

plugin = CtHeadBleedPlugin()

__all__ = ["CtHeadBleedPlugin", "plugin"]
