"""ct_lung_unet: left and right lung segmentation on CT by a trained 2-D U-Net."""

from infergate_plugins.ct_lung_unet.plugin import CtLungUnetPlugin

plugin = CtLungUnetPlugin()

__all__ = ["CtLungUnetPlugin", "plugin"]
