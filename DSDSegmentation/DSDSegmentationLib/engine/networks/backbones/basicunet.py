"""MONAI BasicUNet as a light DSD backbone suited to CPU training."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import BasicUNet

from ...errors import ConfigError
from .base import BackboneSpec, Scale, Tap


class BasicUNetSpec(BackboneSpec):
    """Five-level BasicUNet; ``features`` = (f0, f1, f2, f3, f4, f_out).

    Taps: encoder = ``conv_0``, ``down_1``..``down_3`` (teacher ``down_3`` at 1/8); decoder = ``down_4``
    (bottleneck), ``upcat_4``, ``upcat_3``, ``upcat_2`` (teacher at 1/2).
    """

    name = "basicunet"
    description = "MONAI BasicUNet, light CNN for CPU (default features 16-16-32-64-128-16)"
    default_share_heads = True  # CNN U-Net with equal skip/decoder widths: shared as the reference DynUNet

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {"features": (16, 16, 32, 64, 128, 16), "dropout": 0.0}

    def validate(self) -> None:
        f = self.options["features"]
        if len(f) != 6 or any(int(v) < 1 for v in f):
            raise ConfigError(f"BasicUNet features must be six positive integers, got {f}")

    def divisor(self) -> Scale:
        return (16, 16, 16)

    def build(self) -> BasicUNet:
        return BasicUNet(
            spatial_dims=3,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            features=tuple(int(v) for v in self.options["features"]),
            dropout=self.options["dropout"],
        )

    def taps(self) -> list[Tap]:
        f = [int(v) for v in self.options["features"]]
        s = lambda k: (k, k, k)  # noqa: E731
        return [
            Tap("enc1", "enc", "conv_0", f[0], s(1)),
            Tap("enc2", "enc", "down_1", f[1], s(2)),
            Tap("enc3", "enc", "down_2", f[2], s(4)),
            Tap("enc4", "enc", "down_3", f[3], s(8)),
            Tap("dec4", "dec", "down_4", f[4], s(16)),
            Tap("dec3", "dec", "upcat_4", f[3], s(8)),
            Tap("dec2", "dec", "upcat_3", f[2], s(4)),
            Tap("dec1", "dec", "upcat_2", f[1], s(2)),
        ]
