"""The DSD head: 1×1×1 convolution to K class logits, then up-sampling to the input grid."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from monai.networks.blocks import UnetOutBlock, UpSample

from .backbones.base import Scale


def upsample_steps(scale: Scale) -> list[Scale]:
    """Split a per-axis scale into 2× steps, e.g. (8, 8, 2) → [(2, 2, 2), (2, 2, 1), (2, 2, 1)].

    Scales that are not powers of two on every axis are done in a single step of the full factor.
    """
    if not all(s > 0 and s & (s - 1) == 0 for s in scale):
        return [tuple(scale)]
    logs = [int(math.log2(s)) for s in scale]
    if max(logs) == 0:
        return [(1, 1, 1)]
    return [tuple(2 if i < n else 1 for n in logs) for i in range(max(logs))]


class DSDHead(nn.Module):
    """Training-only head mapping a feature map at ``scale`` to full-resolution logits.

    Args:
        in_channels: channels of the tapped feature map.
        num_classes: K, the number of output classes.
        scale: down-sampling factor of the tap per axis.
        mode: ``deconv_shared`` (reference: one 2× transposed conv applied log2(s) times, weights shared; one
            module per distinct step shape when strides are anisotropic), ``deconv`` (one transposed conv per
            step) or ``trilinear`` (no parameters beyond the 1×1×1 conv).
    """

    def __init__(self, in_channels: int, num_classes: int, scale: Scale, mode: str = "deconv_shared"):
        super().__init__()
        self.scale = tuple(scale)
        self.mode = mode
        self.proj = UnetOutBlock(spatial_dims=3, in_channels=in_channels, out_channels=num_classes)
        steps = upsample_steps(self.scale)
        if mode == "trilinear":
            self.ups = nn.ModuleList()
            self.order: list[int] = []
        elif mode == "deconv":
            self.ups = nn.ModuleList(self._deconv(num_classes, s) for s in steps)
            self.order = list(range(len(steps)))
        else:  # deconv_shared
            distinct = list(dict.fromkeys(steps))
            self.ups = nn.ModuleList(self._deconv(num_classes, s) for s in distinct)
            self.order = [distinct.index(s) for s in steps]

    @staticmethod
    def _deconv(k: int, step: Scale) -> nn.Module:
        # kernel = stride = step: (1,1,1) gives the reference's 1×1×1 transposed conv at full resolution
        return UpSample(3, in_channels=k, out_channels=k, scale_factor=step, kernel_size=step, mode="deconv")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if self.mode == "trilinear":
            if self.scale != (1, 1, 1):
                x = nn.functional.interpolate(x, scale_factor=self.scale, mode="trilinear", align_corners=False)
            return x
        for i in self.order:
            x = self.ups[i](x)
        return x
