"""The network of ``ct_lung_unet``: a small 2-D U-Net applied to each axial slice.

What is exported to ONNX is :class:`Deployed`: int16 Hounsfield units in, uint8
labels out, the same contract as ``ct_lung_seg`` (0 background, 1 and 2 the two
lungs, 1 being the one at smaller column indices), so one plugin's pre- and
postprocess serve either model. Inside the graph: the HU scaled, the slice averaged
down 4x4 (a 512 x 512 slice is seen at 128 x 128), a channel of each column's place
across the image (laterality is a matter of where, which convolutions alone do not
see), three levels of two 3x3 convolutions each, the logits upsampled back
bilinearly, and their argmax. Rows and columns must be multiples of 16 (the plugin
pads them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - torch's own convention
from torch import nn

CLASSES = 3  # background, lung at smaller columns, lung at larger columns
DOWNSAMPLE = 4
MULTIPLE = 16  # DOWNSAMPLE x the U-Net's two poolings


def _block(inputs: int, outputs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inputs, outputs, 3, padding=1),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
        nn.Conv2d(outputs, outputs, 3, padding=1),
        nn.BatchNorm2d(outputs),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Logits of :data:`CLASSES` at the resolution of its input (N, 2, H, W): the
    scaled slice and the column channel."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.enc1 = _block(2, width)
        self.enc2 = _block(width, 2 * width)
        self.bottom = _block(2 * width, 4 * width)
        self.up2 = nn.ConvTranspose2d(4 * width, 2 * width, 2, stride=2)
        self.dec2 = _block(4 * width, 2 * width)
        self.up1 = nn.ConvTranspose2d(2 * width, width, 2, stride=2)
        self.dec1 = _block(2 * width, width)
        self.head = nn.Conv2d(width, CLASSES, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], 1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], 1))
        logits: torch.Tensor = self.head(d1)
        return logits


def network_input(hu: torch.Tensor) -> torch.Tensor:
    """(N, H, W) HU of any dtype -> (N, 2, H/4, W/4): the slice scaled to about
    -1..1 over air..soft tissue, averaged 4x4, and the column channel (-1 at the
    first column, 1 at the last)."""
    scaled = (hu.float().clamp(-1024.0, 1024.0) + 400.0) / 600.0
    small = F.avg_pool2d(scaled.unsqueeze(1), DOWNSAMPLE)
    columns = small.shape[-1]
    place = torch.arange(columns, dtype=torch.float32) * (2.0 / (columns - 1)) - 1.0
    column = place.view(1, 1, 1, columns).expand_as(small)
    return torch.cat([small, column], 1)


class Deployed(nn.Module):
    """int16 HU (N, H, W) -> uint8 labels (N, H, W): what runs in Triton."""

    def __init__(self, net: UNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, hu: torch.Tensor) -> torch.Tensor:
        logits = self.net(network_input(hu))
        full = F.interpolate(logits, scale_factor=float(DOWNSAMPLE), mode="bilinear")
        return full.argmax(1).to(torch.uint8)
