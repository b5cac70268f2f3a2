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
        """Same values as :meth:`forward_modules`, computed as matrix products (3-10x faster on CPU than the
        small-channel convolutions): a 1×1×1 conv is a matmul over channels, and a transposed conv whose kernel
        equals its stride is a matmul followed by a voxel shuffle. A 1×1×1 transposed conv is folded into the
        projection (two linear maps in a row), which autograd differentiates exactly as the two modules."""
        conv = self.proj.conv.conv  # UnetOutBlock -> Convolution -> Conv3d
        w, b = conv.weight.flatten(1), conv.bias  # (K, C), (K,)
        ups = [self.ups[i].deconv for i in self.order]
        if ups and ups[0].stride == (1, 1, 1):
            w2 = ups[0].weight.flatten(1).t()  # ConvTranspose3d weight (in, out, 1, 1, 1) -> (out, in)
            w, b = w2 @ w, w2 @ b + ups[0].bias
            ups = ups[1:]
        x = _pointwise(x, w, b)
        if self.mode == "trilinear":
            if self.scale != (1, 1, 1):
                x = nn.functional.interpolate(x, scale_factor=self.scale, mode="trilinear", align_corners=False)
            return x
        for up in ups:
            x = _deconv_kernel_eq_stride(x, up.weight, up.bias, up.stride)
        return x

    def forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """Reference path through the MONAI modules (used by the tests to check :meth:`forward`)."""
        x = self.proj(x)
        if self.mode == "trilinear":
            if self.scale != (1, 1, 1):
                x = nn.functional.interpolate(x, scale_factor=self.scale, mode="trilinear", align_corners=False)
            return x
        for i in self.order:
            x = self.ups[i](x)
        return x


def _pointwise(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1×1×1 convolution of x (B, C, *S) with w (K, C) and bias b (K,); the bias is added inside the product."""
    bsz, c, *spatial = x.shape
    y = torch.baddbmm(b.view(1, -1, 1), w.expand(bsz, -1, -1), x.reshape(bsz, c, -1))
    return y.view(bsz, -1, *spatial)


def _deconv_kernel_eq_stride(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, k: tuple[int, ...]) -> torch.Tensor:
    """ConvTranspose3d with kernel == stride (no overlap): out[o, x·k+p] = Σ_i in[i, x]·w[i, o, p] + b[o].

    The bias is added inside the product (one pass over the output instead of two), then one voxel shuffle."""
    bsz, cin, sx, sy, sz = x.shape
    cout, kk = w.shape[1], k[0] * k[1] * k[2]
    wm = w.permute(1, 2, 3, 4, 0).reshape(cout * kk, cin)
    bias = b.repeat_interleave(kk).view(1, -1, 1)
    y = torch.baddbmm(bias, wm.expand(bsz, -1, -1), x.reshape(bsz, cin, -1)).view(bsz, cout, k[0], k[1], k[2], sx, sy, sz)
    return y.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(bsz, cout, sx * k[0], sy * k[1], sz * k[2])
