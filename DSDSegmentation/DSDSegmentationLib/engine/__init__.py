"""DSDSegmentation engine: Qt-free and Slicer-free (torch + MONAI only).

Networks with dual self-distillation heads and their loss, data, training, inference, metrics and model
packages. Nothing here may import ``slicer``, ``qt`` or ``vtk``. Names are imported lazily, so torch-free parts
(``engine.cards``) can be used where torch is not installed yet (the Slicer process before first use).
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "BACKBONES": ".networks", "DSDNet": ".networks", "DSDOutput": ".networks", "get_backbone_spec": ".networks",
    "DSDConfig": ".config", "NetworkConfig": ".config", "DSD_PRESETS": ".config",
    "ConfigError": ".errors", "DSDError": ".errors", "InputError": ".errors",
    "DSDLoss": ".losses", "pixelwise_kl": ".losses",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
