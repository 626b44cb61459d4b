"""What a plugin author (and Infergate's own tests) need: synthetic series builders."""

from infergate.testing.phantoms import ChestPhantom, PhantomIdentity, write_chest_ct

__all__ = ["ChestPhantom", "PhantomIdentity", "write_chest_ct"]
