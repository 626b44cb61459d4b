"""What a plugin author (and Infergate's own tests) need: synthetic series builders (chest
and head CT, chest radiograph), the conformance check every plugin must pass, and the
check of every code in the objects it makes."""

from infergate.testing.coded import code_problems
from infergate.testing.conformance import check_plugin, synthetic_series
from infergate.testing.head_phantom import (
    LEFT_FRONTAL,
    RIGHT_PARIETAL,
    HeadPhantom,
    Hyperdensity,
    write_head_ct,
)
from infergate.testing.phantoms import ChestPhantom, PhantomIdentity, write_chest_ct
from infergate.testing.radiograph_phantom import ChestRadiograph, write_chest_radiograph

__all__ = [
    "LEFT_FRONTAL",
    "RIGHT_PARIETAL",
    "ChestPhantom",
    "ChestRadiograph",
    "HeadPhantom",
    "Hyperdensity",
    "PhantomIdentity",
    "check_plugin",
    "code_problems",
    "synthetic_series",
    "write_chest_ct",
    "write_chest_radiograph",
    "write_head_ct",
]
