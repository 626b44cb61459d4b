"""ct_lung: left and right lung segmentation on CT, with each lung's volume."""

from infergate_plugins.ct_lung.plugin import CtLungPlugin

plugin = CtLungPlugin()

__all__ = ["CtLungPlugin", "plugin"]
