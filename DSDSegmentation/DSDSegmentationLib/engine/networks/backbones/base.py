"""Common description of a U-shaped backbone: how to build it and where DSD taps its stages."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch.nn as nn

from ...errors import ConfigError

Scale = tuple[int, int, int]


@dataclass(frozen=True)
class Tap:
    """One stage of a backbone whose feature map feeds a DSD head.

    Attributes:
        name: head name as in the paper's code (``enc1``..``enc4``, ``dec4``..``dec1``).
        role: ``"enc"`` or ``"dec"``.
        module: dotted path of the submodule that produces (or receives) the feature map.
        channels: feature channels at the tap.
        scale: down-sampling factor of the tap relative to the input, per spatial axis.
        use_input: read the first positional input of ``module`` (forward pre-hook) instead of its output.
    """

    name: str
    role: str
    module: str
    channels: int
    scale: Scale
    use_input: bool = False


def as_triple(value: int | Sequence[int], what: str) -> Scale:
    """Turn an int or a length-3 sequence into a 3-tuple of positive ints."""
    if isinstance(value, (int, np.integer)):
        out = (int(value),) * 3
    else:
        out = tuple(int(v) for v in value)
    if len(out) != 3 or min(out) < 1:
        raise ConfigError(f"{what} must be a positive int or three positive ints, got {value!r}")
    return out  # type: ignore[return-value]


class BackboneSpec(ABC):
    """Builds one MONAI network and lists its DSD taps.

    Subclasses never copy network code: they construct the MONAI class and name the submodules
    whose outputs DSD reads through forward hooks.
    """

    #: registry key, e.g. ``"dynunet"``
    name: str = ""
    #: short human description for ``dsdseg backbones``
    description: str = ""
    #: default of ``share_heads`` (what the reference code does for this backbone)
    default_share_heads: bool = False

    def __init__(self, in_channels: int, out_channels: int, patch_size: Sequence[int], options: Mapping[str, Any] | None = None):
        if not isinstance(in_channels, int) or in_channels < 1:
            raise ConfigError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        if not isinstance(out_channels, int) or out_channels < 2:
            raise ConfigError(
                f"out_channels (number of classes K, background included) must be >= 2, got {out_channels!r}"
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = as_triple(patch_size, "patch_size")
        opts = dict(self.default_options())
        unknown = set(options or {}) - set(opts)
        if unknown:
            raise ConfigError(
                f"unknown option(s) {sorted(unknown)} for backbone '{self.name}'; known: {sorted(opts)}"
            )
        opts.update(options or {})
        self.options = opts
        self.validate()
        div = self.divisor()
        bad = [p for p, d in zip(self.patch_size, div) if p % d]
        if bad:
            raise ConfigError(
                f"patch size {self.patch_size} is not divisible by {div}, the total down-sampling of "
                f"backbone '{self.name}'; use multiples of {div} per axis"
            )

    @classmethod
    def default_options(cls) -> dict[str, Any]:
        """Backbone-specific keyword options and their defaults."""
        return {}

    def validate(self) -> None:
        """Raise :class:`ConfigError` for inconsistent options (called before anything is built)."""

    @abstractmethod
    def divisor(self) -> Scale:
        """Each axis of a training patch (and sliding window) must be a multiple of this."""

    @abstractmethod
    def build(self) -> nn.Module:
        """Construct the plain MONAI network."""

    @abstractmethod
    def taps(self) -> list[Tap]:
        """Encoder taps fine→coarse, then decoder taps coarse→fine (4 + 4 for the reference configs)."""

    def tap_table(self) -> list[dict[str, Any]]:
        """The taps as rows (name, role, module, channels, scale, teacher) for documentation."""
        taps = self.taps()
        enc = [t for t in taps if t.role == "enc"]
        dec = [t for t in taps if t.role == "dec"]
        teachers = {enc[-1].name, dec[-1].name}
        return [
            {
                "head": t.name,
                "role": t.role,
                "module": t.module + (" (input)" if t.use_input else ""),
                "channels": t.channels,
                "scale": "x".join(str(s) for s in t.scale),
                "teacher": t.name in teachers,
            }
            for t in taps
        ]
