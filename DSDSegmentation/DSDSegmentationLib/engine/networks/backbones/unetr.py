"""MONAI UNETR (ViT encoder) as a DSD backbone."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import UNETR

from ...errors import ConfigError
from .base import BackboneSpec, Scale, Tap


class UNETRSpec(BackboneSpec):
    """UNETR with ViT patch 16; the network is built for ``img_size = patch_size``.

    Taps as the reference: encoder1..encoder4 (teacher encoder4, 1/8); decoder = the projected ViT output
    (input of ``decoder5``, 1/16), decoder5, decoder4, decoder3 (teacher, 1/2).
    """

    name = "unetr"
    description = "MONAI UNETR (ViT-B/16 encoder by default); input size fixed to the patch size"
    default_share_heads = False  # reference: 8 separate heads

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {
            "feature_size": 16,
            "hidden_size": 768,
            "mlp_dim": 3072,
            "num_heads": 12,
            "res_block": True,
            "norm_name": "instance",
            "dropout_rate": 0.0,
        }

    def validate(self) -> None:
        o = self.options
        if o["hidden_size"] % o["num_heads"]:
            raise ConfigError(f"UNETR: hidden_size {o['hidden_size']} must be divisible by num_heads {o['num_heads']}")

    def divisor(self) -> Scale:
        return (16, 16, 16)

    def build(self) -> UNETR:
        o = self.options
        return UNETR(
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            img_size=self.patch_size,
            feature_size=o["feature_size"],
            hidden_size=o["hidden_size"],
            mlp_dim=o["mlp_dim"],
            num_heads=o["num_heads"],
            norm_name=o["norm_name"],
            res_block=o["res_block"],
            dropout_rate=o["dropout_rate"],
        )

    def taps(self) -> list[Tap]:
        fs = self.options["feature_size"]
        s = lambda k: (k, k, k)  # noqa: E731
        return [
            Tap("enc1", "enc", "encoder1", fs, s(1)),
            Tap("enc2", "enc", "encoder2", 2 * fs, s(2)),
            Tap("enc3", "enc", "encoder3", 4 * fs, s(4)),
            Tap("enc4", "enc", "encoder4", 8 * fs, s(8)),
            Tap("dec4", "dec", "decoder5", self.options["hidden_size"], s(16), use_input=True),
            Tap("dec3", "dec", "decoder5", 8 * fs, s(8)),
            Tap("dec2", "dec", "decoder4", 4 * fs, s(4)),
            Tap("dec1", "dec", "decoder3", 2 * fs, s(2)),
        ]
