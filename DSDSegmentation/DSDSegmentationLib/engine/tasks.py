"""Task presets (data, not code): channels, labels, preprocessing, patch size and backbone per task.

Built-in presets are the JSON files in ``engine/presets``; a user preset is any JSON file with the same keys.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import NetworkConfig
from .errors import ConfigError, read_json
from .terminology import validate_entry

PRESET_DIR = Path(__file__).parent / "presets"
NORMALIZATIONS = ("zscore", "percentile", "ct_window", "none")


@dataclass
class TaskPreset:
    """Everything needed to turn a dataset of one task into training patches and back into labels."""

    name: str
    channels: list[str]
    labels: dict[int, str]
    normalization: list[dict[str, Any]]
    patch_size: tuple[int, int, int]
    title: str = ""
    label_colors: dict[int, list[int]] = field(default_factory=dict)  # RGB 0-255 per foreground label
    terminology: dict[int, dict[str, str]] = field(default_factory=dict)  # coded entries per label (terminology.py)
    orientation: str | None = "RAS"
    spacing: list[float] | None = None
    crop_foreground: bool = False
    network: dict[str, Any] = field(default_factory=lambda: {"backbone": "basicunet", "options": {}})
    training: dict[str, Any] = field(default_factory=dict)
    inference: dict[str, Any] = field(default_factory=dict)
    # interactive use: field of view around a click (mm), whether a region is required, whether the structure
    # comes in a left and a right copy (named from the volume's RAS orientation)
    roi: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = {int(k): str(v) for k, v in self.labels.items()}
        self.label_colors = {int(k): [int(c) for c in v] for k, v in self.label_colors.items()}
        self.terminology = {int(k): validate_entry(v, f"preset '{self.name}' label {k}")
                            for k, v in self.terminology.items()}
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if 0 not in self.labels:
            raise ConfigError(f"preset '{self.name}': labels must include 0 (background)")
        if sorted(self.labels) != list(range(len(self.labels))):
            raise ConfigError(f"preset '{self.name}': label values must be 0..K-1 without gaps, got {sorted(self.labels)}")
        for table, what in ((self.label_colors, "label_colors"), (self.terminology, "terminology")):
            stray = sorted(set(table) - set(self.labels) | ({0} & set(table)))
            if stray:
                raise ConfigError(f"preset '{self.name}': {what} for label value(s) {stray}, which are not foreground labels")
        if len(self.labels) < 2:
            raise ConfigError(f"preset '{self.name}': at least one foreground label is needed")
        if not self.channels:
            raise ConfigError(f"preset '{self.name}': at least one input channel is needed")
        if len(self.normalization) != len(self.channels):
            raise ConfigError(
                f"preset '{self.name}': {len(self.channels)} channel(s) but {len(self.normalization)} normalization entries"
            )
        for n in self.normalization:
            if n.get("kind") not in NORMALIZATIONS:
                raise ConfigError(f"preset '{self.name}': normalization kind must be one of {NORMALIZATIONS}, got {n}")
        if self.roi:
            unknown = set(self.roi) - {"size_mm", "required", "sides"}
            size = self.roi.get("size_mm")
            if unknown or not (isinstance(size, list) and len(size) == 3 and all(float(v) > 0 for v in size)):
                raise ConfigError(f"preset '{self.name}': roi needs size_mm (three positive mm) and optional required, "
                                  f"sides; got {self.roi}")
        if self.spacing is not None and len(self.spacing) != 3:
            raise ConfigError(f"preset '{self.name}': spacing needs 3 values (non-positive keeps the native one)")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def network_config(self, **overrides: Any) -> NetworkConfig:
        net = {"backbone": self.network.get("backbone", "basicunet"), "options": dict(self.network.get("options", {}))}
        net.update({k: v for k, v in overrides.items() if v is not None})
        return NetworkConfig(
            backbone=net["backbone"],
            in_channels=len(self.channels),
            out_channels=self.num_classes,
            patch_size=tuple(net.get("patch_size", self.patch_size)),
            options=net["options"],
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = {str(k): v for k, v in self.labels.items()}
        d["label_colors"] = {str(k): v for k, v in self.label_colors.items()}
        d["terminology"] = {str(k): v for k, v in self.terminology.items()}
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TaskPreset":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown preset key(s) {sorted(unknown)}; known: {sorted(known)}")
        missing = {"name", "channels", "labels", "normalization", "patch_size"} - set(d)
        if missing:
            raise ConfigError(f"preset is missing key(s) {sorted(missing)}")
        return cls(**d)


def builtin_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.json"))


def load_preset(name_or_path: str | Path) -> TaskPreset:
    """A built-in preset by name (``hippocampus``, ``cardiac``, ``brain_tumour``) or a JSON file."""
    p = Path(name_or_path)
    if not p.suffix and (PRESET_DIR / f"{name_or_path}.json").is_file():
        p = PRESET_DIR / f"{name_or_path}.json"
    if not p.is_file():
        raise ConfigError(f"unknown task preset '{name_or_path}'; built-in: {', '.join(builtin_presets())}, or a JSON file")
    return TaskPreset.from_dict(read_json(p, ConfigError, f"preset {p}"))
