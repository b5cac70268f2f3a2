"""DSD networks: MONAI backbones with training-only self-distillation heads."""

from .backbones import BACKBONES, BackboneSpec, Tap, get_backbone_spec
from .dsd_net import DSDNet, DSDOutput
from .heads import DSDHead, upsample_steps

__all__ = ["BACKBONES", "BackboneSpec", "DSDHead", "DSDNet", "DSDOutput", "Tap", "get_backbone_spec", "upsample_steps"]
