"""MONAI VNet as a DSD backbone."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import VNet

from ...errors import ConfigError
from .base import BackboneSpec, Scale, Tap


class VNetSpec(BackboneSpec):
    """VNet (16 base channels, ELU, batch norm, dropout 0.5 as MONAI and the reference).

    Taps as the reference: in_tr, down_tr32, down_tr64, down_tr128 (teacher, 1/8); down_tr256 (bottleneck),
    up_tr256, up_tr128, up_tr64 (teacher, 1/2). VNet's first block repeats the input up to 16 channels, so
    ``in_channels`` must divide 16.
    """

    name = "vnet"
    description = "MONAI VNet (16 base channels); in_channels must divide 16"
    default_share_heads = False  # reference: separate heads

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        return {"dropout_prob_down": 0.5, "dropout_prob_up": (0.5, 0.5)}

    def validate(self) -> None:
        if 16 % self.in_channels:
            raise ConfigError(
                f"VNet needs in_channels that divides 16 (1, 2, 4, 8 or 16), got {self.in_channels}; "
                "choose another backbone for this number of inputs"
            )

    def divisor(self) -> Scale:
        return (16, 16, 16)

    def build(self) -> VNet:
        return VNet(
            spatial_dims=3,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            dropout_prob_down=self.options["dropout_prob_down"],
            dropout_prob_up=tuple(self.options["dropout_prob_up"]),
        )

    def taps(self) -> list[Tap]:
        s = lambda k: (k, k, k)  # noqa: E731
        return [
            Tap("enc1", "enc", "in_tr", 16, s(1)),
            Tap("enc2", "enc", "down_tr32", 32, s(2)),
            Tap("enc3", "enc", "down_tr64", 64, s(4)),
            Tap("enc4", "enc", "down_tr128", 128, s(8)),
            Tap("dec4", "dec", "down_tr256", 256, s(16)),
            Tap("dec3", "dec", "up_tr256", 256, s(8)),
            Tap("dec2", "dec", "up_tr128", 128, s(4)),
            Tap("dec1", "dec", "up_tr64", 64, s(2)),
        ]
