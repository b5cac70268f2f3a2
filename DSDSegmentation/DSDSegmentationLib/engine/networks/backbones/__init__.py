"""Registry of DSD backbones (one MONAI network per file)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ...errors import ConfigError
from .base import BackboneSpec, Tap
from .basicunet import BasicUNetSpec
from .dynunet import DynUNetSpec
from .swinunetr import SwinUNETRSpec
from .unetr import UNETRSpec
from .vnet import VNetSpec

BACKBONES: dict[str, type[BackboneSpec]] = {
    cls.name: cls for cls in (DynUNetSpec, BasicUNetSpec, UNETRSpec, SwinUNETRSpec, VNetSpec)
}


def get_backbone_spec(
    name: str, in_channels: int, out_channels: int, patch_size: Sequence[int], options: Mapping[str, Any] | None = None
) -> BackboneSpec:
    """Look up a backbone by name and validate its configuration."""
    key = str(name).lower()
    if key not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; available: {', '.join(sorted(BACKBONES))}")
    return BACKBONES[key](in_channels, out_channels, patch_size, options)


__all__ = ["BACKBONES", "BackboneSpec", "Tap", "get_backbone_spec"]
