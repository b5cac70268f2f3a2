"""DSDNet: a MONAI U-shaped backbone plus training-only DSD heads on its encoder and decoder stages."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..config import DSDConfig, NetworkConfig
from ..errors import InputError
from .backbones import BackboneSpec, Tap, get_backbone_spec
from .heads import DSDHead


class DSDOutput(NamedTuple):
    """Training-mode output. ``dec`` is ordered coarse→fine (last = decoder teacher, 1/2 resolution);
    ``enc`` fine→coarse (last = encoder teacher, the deepest skip). All maps are full-resolution logits."""

    main: torch.Tensor
    dec: tuple[torch.Tensor, ...]
    enc: tuple[torch.Tensor, ...]
    dec_names: tuple[str, ...]
    enc_names: tuple[str, ...]

    @property
    def dec_teacher(self) -> torch.Tensor:
        return self.dec[-1]

    @property
    def enc_teacher(self) -> torch.Tensor:
        return self.enc[-1]

    def as_reference_tuple(self) -> tuple[torch.Tensor, ...]:
        """The reference code's 9-tuple ``(main, dec4, dec3, dec2, dec1, enc1, enc2, enc3, enc4)``."""
        return (self.main, *self.dec, *self.enc)


class DSDNet(nn.Module):
    """Wraps a plain MONAI backbone; heads read its stages through forward hooks during training.

    In eval mode ``forward`` is exactly the backbone's forward (no hooks exist outside a training forward), so
    output and speed equal the plain network. In training mode ``forward`` returns :class:`DSDOutput` (or the
    plain tensor when the DSD config needs no heads). :meth:`export_backbone` gives a head-free copy for inference.
    """

    def __init__(self, net: NetworkConfig, dsd: DSDConfig | None = None):
        super().__init__()
        self.net_config = net
        self.dsd_config = dsd or DSDConfig()
        self.spec: BackboneSpec = get_backbone_spec(net.backbone, net.in_channels, net.out_channels, net.patch_size, net.options)
        self.backbone = self.spec.build()
        taps = self.spec.taps()
        enc = [t for t in taps if t.role == "enc"] if self.dsd_config.needs_encoder_heads else []
        dec = [t for t in taps if t.role == "dec"] if self.dsd_config.needs_decoder_heads else []
        self.enc_taps: tuple[Tap, ...] = tuple(enc)
        self.dec_taps: tuple[Tap, ...] = tuple(dec)
        share = self.spec.default_share_heads if self.dsd_config.share_heads is None else self.dsd_config.share_heads
        self.share_heads = bool(share)
        self.heads = nn.ModuleDict()
        self.head_of: dict[str, str] = {}  # tap name -> key in self.heads
        first_of_shape: dict[tuple, str] = {}
        for tap in (*enc, *dec):
            # with sharing, an encoder and a decoder tap of equal scale and width use one head (reference DynUNet)
            key = first_of_shape.setdefault((tap.scale, tap.channels), tap.name) if self.share_heads else tap.name
            if key not in self.heads:
                self.heads[key] = DSDHead(tap.channels, net.out_channels, tap.scale, self.dsd_config.upsample)
            self.head_of[tap.name] = key

    def _capture(self, features: dict[str, torch.Tensor]) -> list[Any]:
        """Register one forward (pre-)hook per tap that stores its feature map in ``features``.

        Hooks exist only during a training forward, so eval and exported models run the backbone untouched."""
        handles = []
        for tap in (*self.enc_taps, *self.dec_taps):
            module = self.backbone.get_submodule(tap.module)
            if tap.use_input:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, name=tap.name: features.__setitem__(name, args[0])))
            else:
                handles.append(module.register_forward_hook(
                    lambda _m, _args, out, name=tap.name: features.__setitem__(name, out)))
        return handles

    @property
    def has_heads(self) -> bool:
        return len(self.heads) > 0

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputError` naming the problem if ``x`` cannot go through the network."""
        if x.ndim != 5:
            raise InputError(f"expected a 5D tensor (batch, channel, x, y, z), got shape {tuple(x.shape)}")
        if x.shape[1] != self.net_config.in_channels:
            raise InputError(
                f"the model expects {self.net_config.in_channels} input channel(s), got {x.shape[1]}"
            )
        div = self.spec.divisor()
        if any(s % d for s, d in zip(x.shape[2:], div)):
            raise InputError(
                f"spatial size {tuple(x.shape[2:])} is not divisible by {div} (backbone '{self.spec.name}'); "
                "pad the input or use sliding-window inference"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor | DSDOutput:
        if not (self.training and self.has_heads):
            return self.backbone(x)
        self.check_input(x)
        feats: dict[str, torch.Tensor] = {}
        handles = self._capture(feats)
        try:
            main = self.backbone(x)
        finally:
            for h in handles:
                h.remove()
        size = tuple(x.shape[2:])

        def run(taps: tuple[Tap, ...]) -> tuple[torch.Tensor, ...]:
            outs = []
            for t in taps:
                y = self.heads[self.head_of[t.name]](feats[t.name])
                if tuple(y.shape[2:]) != size:
                    raise RuntimeError(
                        f"DSD head {t.name} on '{t.module}' gave spatial size {tuple(y.shape[2:])}, expected {size}: "
                        f"the tap table of backbone '{self.spec.name}' does not match the network"
                    )
                outs.append(y)
            return tuple(outs)

        return DSDOutput(
            main=main,
            dec=run(self.dec_taps),
            enc=run(self.enc_taps),
            dec_names=tuple(t.name for t in self.dec_taps),
            enc_names=tuple(t.name for t in self.enc_taps),
        )

    def export_backbone(self) -> nn.Module:
        """A fresh plain backbone with this model's backbone weights: no heads, no hooks."""
        plain = self.spec.build()
        plain.load_state_dict(self.backbone.state_dict())
        return plain.train(self.training)

    def num_parameters(self) -> dict[str, int]:
        """Trainable parameters of the backbone, the heads and both."""
        count = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
        b, h = count(self.backbone), count(self.heads)
        return {"backbone": b, "heads": h, "total": b + h}
