"""cxr_quality: quality checks of frontal chest radiographs, reported in an SR."""

from infergate_plugins.cxr_quality.plugin import CxrQualityPlugin

plugin = CxrQualityPlugin()

__all__ = ["CxrQualityPlugin", "plugin"]
