"""MONAI SwinUNETR as a DSD backbone."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import SwinUNETR

from ...errors import ConfigError
from .base import BackboneSpec, Scale, Tap


class SwinUNETRSpec(BackboneSpec):
    """SwinUNETR (patch 2, four Swin stages); trained from scratch.

    Taps as the reference: encoder1..encoder4 (teacher encoder4, 1/8); decoder5 (1/16), decoder4, decoder3,
    decoder2 (teacher, 1/2). The 1/32 bottleneck has no head.
    """

    name = "swinunetr"
    description = "MONAI SwinUNETR (Swin transformer encoder), feature_size multiple of 12"
    default_share_heads = True  # reference shares encoder/decoder heads at equal resolution

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "feature_size": 12,
            "depths": (2, 2, 2, 2),
            "num_heads": (3, 6, 12, 24),
            "window_size": 7,
            "norm_name": "instance",
            "use_v2": False,
        }

    def validate(self) -> None:
        fs = self.options["feature_size"]
        if fs % 12:
            raise ConfigError(f"SwinUNETR: feature_size must be a multiple of 12, got {fs}")

    def divisor(self) -> Scale:
        return (32, 32, 32)

    def build(self) -> SwinUNETR:
        o = self.options
        return SwinUNETR(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            feature_size=o["feature_size"],
            depths=tuple(o["depths"]),
            num_heads=tuple(o["num_heads"]),
            window_size=o["window_size"],
            norm_name=o["norm_name"],
            use_v2=o["use_v2"],
        )

    def taps(self) -> list[Tap]:
        fs = self.options["feature_size"]
        s = lambda k: (k, k, k)  # noqa: E731
        return [
            Tap("enc1", "enc", "encoder1", fs, s(1)),
            Tap("enc2", "enc", "encoder2", fs, s(2)),
            Tap("enc3", "enc", "encoder3", 2 * fs, s(4)),
            Tap("enc4", "enc", "encoder4", 4 * fs, s(8)),
            Tap("dec4", "dec", "decoder5", 8 * fs, s(16)),
            Tap("dec3", "dec", "decoder4", 4 * fs, s(8)),
            Tap("dec2", "dec", "decoder3", 2 * fs, s(4)),
            Tap("dec1", "dec", "decoder2", fs, s(2)),
        ]
