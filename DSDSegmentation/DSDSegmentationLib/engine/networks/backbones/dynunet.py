"""MONAI DynUNet (the nnU-Net architecture) as a DSD backbone."""

from __future__ import annotations

from typing import Any

import numpy as np
from monai.networks.nets import DynUNet

from ...errors import ConfigError
from .base import BackboneSpec, Scale, Tap, as_triple


class DynUNetSpec(BackboneSpec):
    """DynUNet with ``len(filters)`` levels; supports anisotropic strides such as ``(2, 2, 1)``.

    Taps (5 levels): encoder = input block and the three down-sampling blocks (teacher: the 1/8 one, the deepest
    skip); decoder = bottleneck and the first three up-sampling blocks (teacher: the 1/2 one).
    """

    name = "dynunet"
    description = "MONAI DynUNet (nnU-Net), residual blocks, instance norm; anisotropic strides allowed"
    default_share_heads = True  # the reference shares encoder/decoder heads at equal resolution

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "filters": (16, 32, 64, 128, 256),
            "strides": (1, 2, 2, 2, 2),
            "kernel_size": 3,
            "res_block": True,
            "norm_name": "instance",
            "dropout": None,
        }

    def validate(self) -> None:
        filters = list(self.options["filters"])
        strides = list(self.options["strides"])
        if len(filters) < 3:
            raise ConfigError(f"DynUNet needs at least 3 levels for DSD (2 encoder and 2 decoder taps), got filters={filters}")
        if len(strides) != len(filters):
            raise ConfigError(
                f"DynUNet: {len(filters)} filters but {len(strides)} strides; give one stride per level"
            )
        if any((not isinstance(f, (int, np.integer))) or f < 1 for f in filters):
            raise ConfigError(f"DynUNet filters must be positive integers, got {filters}")

    def _strides(self) -> list[Scale]:
        return [as_triple(s, "DynUNet stride") for s in self.options["strides"]]

    def _kernels(self) -> list[Scale]:
        ks = self.options["kernel_size"]
        n = len(self.options["filters"])
        if isinstance(ks, (int, np.integer)):
            return [as_triple(ks, "DynUNet kernel_size")] * n
        ks = list(ks)
        if len(ks) != n:
            raise ConfigError(f"DynUNet: kernel_size needs one entry per level ({n}), got {len(ks)}")
        return [as_triple(k, "DynUNet kernel_size") for k in ks]

    def _cumulative(self) -> list[Scale]:
        return [tuple(int(v) for v in np.prod(self._strides()[: i + 1], axis=0)) for i in range(len(self._strides()))]

    def divisor(self) -> Scale:
        return self._cumulative()[-1]

    def build(self) -> DynUNet:
        strides = self._strides()
        return DynUNet(
            spatial_dims=3,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            kernel_size=self._kernels(),
            strides=strides,
            upsample_kernel_size=strides[1:],
            filters=list(self.options["filters"]),
            dropout=self.options["dropout"],
            norm_name=self.options["norm_name"],
            res_block=self.options["res_block"],
            deep_supervision=False,
        )

    def taps(self) -> list[Tap]:
        f = list(self.options["filters"])
        cum = self._cumulative()
        levels = len(f)
        enc = [Tap("enc1", "enc", "input_block", f[0], cum[0])]
        enc += [Tap(f"enc{i + 1}", "enc", f"downsamples.{i - 1}", f[i], cum[i]) for i in range(1, levels - 1)]
        n_dec = levels - 1
        dec = [Tap(f"dec{n_dec}", "dec", "bottleneck", f[-1], cum[-1])]
        for j in range(levels - 2):  # upsamples[j] goes to level levels-2-j; the last (full-res) one feeds the output
            lvl = levels - 2 - j
            dec.append(Tap(f"dec{n_dec - 1 - j}", "dec", f"upsamples.{j}", f[lvl], cum[lvl]))
        return enc + dec
