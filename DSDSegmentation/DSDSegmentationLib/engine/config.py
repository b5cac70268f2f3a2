"""Configuration of a DSD network and its loss: every weight, T and term is data, for ablations."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError

UPSAMPLE_MODES = ("deconv_shared", "deconv", "trilinear")


@dataclass
class NetworkConfig:
    """Which MONAI backbone, its channels and the training patch size (also the sliding window)."""

    backbone: str = "basicunet"
    in_channels: int = 1
    out_channels: int = 3
    patch_size: tuple[int, int, int] = (32, 32, 32)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetworkConfig":
        _check_keys(cls, d)
        d = dict(d)
        if "patch_size" in d:
            d["patch_size"] = tuple(d["patch_size"])
        return cls(**d)


@dataclass
class DSDConfig:
    """Which DSD terms are on, with their weights.

    Loss = main_weight·DiceCE(main) + ds_weight·Σ DiceCE(decoder heads)
           + kl_weight·T²·(Σ KL(dec teacher ‖ dec students) + Σ KL(enc teacher ‖ enc students)).
    """

    deep_supervision: bool = True
    decoder_kl: bool = True
    encoder_kl: bool = True
    temperature: float = 3.0
    kl_weight: float = 1.0
    main_weight: float = 1.0
    ds_weight: float = 1.0
    detach_teacher: bool = False
    share_heads: bool | None = None  # None: the backbone's reference default
    upsample: str = "deconv_shared"

    def __post_init__(self) -> None:
        if self.upsample not in UPSAMPLE_MODES:
            raise ConfigError(f"upsample must be one of {UPSAMPLE_MODES}, got '{self.upsample}'")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        for name in ("kl_weight", "main_weight", "ds_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def needs_decoder_heads(self) -> bool:
        return self.deep_supervision or self.decoder_kl

    @property
    def needs_encoder_heads(self) -> bool:
        return self.encoder_kl

    @property
    def is_plain(self) -> bool:
        return not (self.needs_decoder_heads or self.needs_encoder_heads)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DSDConfig":
        _check_keys(cls, d)
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "DSDConfig":
        """Named ablation presets: ``plain``, ``ds`` (deep supervision only), ``decoder`` (DS + decoder KL),
        ``encoder`` (main loss + encoder KL), ``dsd`` (full, the paper's default)."""
        if name not in DSD_PRESETS:
            raise ConfigError(f"unknown DSD preset '{name}'; available: {', '.join(DSD_PRESETS)}")
        return replace(cls(**DSD_PRESETS[name]), **overrides)


DSD_PRESETS: dict[str, dict[str, bool]] = {
    "plain": {"deep_supervision": False, "decoder_kl": False, "encoder_kl": False},
    "ds": {"deep_supervision": True, "decoder_kl": False, "encoder_kl": False},
    "decoder": {"deep_supervision": True, "decoder_kl": True, "encoder_kl": False},
    "encoder": {"deep_supervision": False, "decoder_kl": False, "encoder_kl": True},
    "dsd": {"deep_supervision": True, "decoder_kl": True, "encoder_kl": True},
}


def _check_keys(cls: type, d: dict[str, Any]) -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} key(s) {sorted(unknown)}; known: {sorted(known)}")
