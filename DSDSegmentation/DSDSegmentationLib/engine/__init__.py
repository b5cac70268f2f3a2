"""DSDSegmentation engine: Qt-free and Slicer-free (torch + MONAI only).

Networks with dual self-distillation heads, their loss, and (in later modules) data, training, inference,
metrics and model packages. Nothing here may import ``slicer``, ``qt`` or ``vtk``.
"""

from .config import DSD_PRESETS, DSDConfig, NetworkConfig
from .errors import ConfigError, DSDError, InputError
from .losses import DSDLoss, pixelwise_kl
from .networks import BACKBONES, DSDNet, DSDOutput, get_backbone_spec

__all__ = [
    "BACKBONES",
    "ConfigError",
    "DSDConfig",
    "DSDError",
    "DSDLoss",
    "DSDNet",
    "DSDOutput",
    "DSD_PRESETS",
    "InputError",
    "NetworkConfig",
    "get_backbone_spec",
    "pixelwise_kl",
]
