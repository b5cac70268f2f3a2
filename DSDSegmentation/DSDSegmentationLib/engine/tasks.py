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

# The one place where training and inference settings get their defaults; a preset's ``training`` / ``inference``
# block may only hold these keys (a misspelt key is an error, never silently the default).
TRAINING_DEFAULTS: dict[str, Any] = {
    "batch_size": 2, "samples_per_volume": 2, "pos": 1.0, "neg": 1.0, "lr": 3e-3, "epochs": 100, "val_every": 5,
    "rot90_axes": [0, 1], "augment": {},
}
# augmentation strengths; 0 switches one off. rotate_deg/scale act in the plane of ``rot90_axes`` (in-plane for
# anisotropic data); gamma is the log-range of the contrast exponent; bias_field the coefficient range of MONAI's
# RandBiasField; noise the std of Gaussian noise (normalised units); blur the max Gaussian sigma (voxels);
# slice_shift the max in-plane shift (voxels) of single slices along the last axis (cine slice misalignment).
AUGMENT_DEFAULTS: dict[str, float] = {"rotate_deg": 0.0, "scale": 0.0, "gamma": 0.0, "bias_field": 0.0, "noise": 0.0,
                                      "blur": 0.0, "slice_shift": 0.0, "background": 0.0, "prob": 0.2}
INFERENCE_DEFAULTS: dict[str, Any] = {"overlap": 0.5, "blend": "gaussian"}


def _typed_block(given: dict[str, Any] | None, defaults: dict[str, Any], what: str) -> dict[str, Any]:
    """``given`` merged over ``defaults``; an unknown key or a value of the wrong kind is a ConfigError."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ConfigError(f"{what}: unknown key(s) {unknown}; known: {sorted(defaults)}")
    out = dict(defaults)
    for k, v in given.items():
        d = defaults[k]
        if isinstance(d, bool) or isinstance(d, str):
            ok = isinstance(v, type(d))
        elif isinstance(d, (int, float)):
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and (isinstance(d, float) or float(v).is_integer())
        else:
            ok = isinstance(v, type(d))
        if not ok:
            raise ConfigError(f"{what}: '{k}' must be a {type(d).__name__}, got {v!r}")
        out[k] = int(v) if isinstance(d, int) and not isinstance(d, bool) else v
    return out


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
    # evaluation regions: unions of label values scored besides the labels (BraTS: whole tumour = 1+2+4, ...)
    regions: dict[str, list[int]] = field(default_factory=dict)
    # after inference: keep the largest connected component of each label ("per_label") or of the foreground
    # ("foreground"); None: the labels as predicted (engine/postprocess.py; kept only where it was measured to help)
    postprocessing: str | None = None

    def __post_init__(self) -> None:
        self.labels = {int(k): str(v) for k, v in self.labels.items()}
        self.label_colors = {int(k): [int(c) for c in v] for k, v in self.label_colors.items()}
        self.terminology = {int(k): validate_entry(v, f"preset '{self.name}' label {k}")
                            for k, v in self.terminology.items()}
        self.patch_size = tuple(int(p) for p in self.patch_size)  # type: ignore[assignment]
        if 0 not in self.labels:
            raise ConfigError(f"preset '{self.name}': labels must include 0 (background)")
        if any(v < 0 or v > 65535 for v in self.labels):
            raise ConfigError(f"preset '{self.name}': label values must be within 0..65535, got {sorted(self.labels)}")
        what = f"preset '{self.name}'"
        self.training = _typed_block(self.training, TRAINING_DEFAULTS, f"{what} training")
        self.training["augment"] = _typed_block(self.training["augment"], AUGMENT_DEFAULTS, f"{what} training.augment")
        self.inference = _typed_block(self.inference, INFERENCE_DEFAULTS, f"{what} inference")
        for k in ("batch_size", "samples_per_volume", "epochs", "val_every"):
            if self.training[k] < 1:
                raise ConfigError(f"{what} training: '{k}' must be at least 1, got {self.training[k]}")
        if not self.training["lr"] > 0:
            raise ConfigError(f"{what} training: 'lr' must be positive, got {self.training['lr']}")
        if not 0 <= float(self.inference["overlap"]) < 1:
            raise ConfigError(f"{what} inference: 'overlap' must be in [0, 1), got {self.inference['overlap']}")
        if self.inference["blend"] not in ("gaussian", "constant"):
            raise ConfigError(f"{what} inference: 'blend' must be 'gaussian' or 'constant', got {self.inference['blend']!r}")
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
        self.regions = {str(k): [int(v) for v in vals] for k, vals in (self.regions or {}).items()}
        for name, vals in self.regions.items():
            stray = sorted(set(vals) - (set(self.labels) - {0}))
            if not vals or stray:
                raise ConfigError(f"preset '{self.name}': region '{name}' must list foreground label values, got {vals}")
        if self.postprocessing not in (None, "foreground", "per_label"):
            raise ConfigError(f"preset '{self.name}': postprocessing must be null, 'foreground' or 'per_label', got "
                              f"{self.postprocessing!r}")
        if self.spacing is not None and len(self.spacing) != 3:
            raise ConfigError(f"preset '{self.name}': spacing needs 3 values (non-positive keeps the native one)")

    def slice_axis_order(self, affine: Any) -> tuple[int, int, int] | None:
        """For a preset that keeps one axis at its native spacing and does not reorient (cardiac: in-plane resampled,
        slices kept on the third axis): the axis order that brings an input's slices there when they lie along
        another axis (a stack converted with slices first, say). The slice axis is the input's clearly coarsest
        (at least twice the spacing of the others). Returns the order (new axis t = old axis ``order[t]``, the two
        in-plane axes keep their order), or None when the slices are already there, unclear, or the preset
        reorients (``orientation`` set) or resamples every axis."""
        import numpy as np

        if self.orientation is not None or not self.spacing:
            return None
        native = [i for i, s in enumerate(self.spacing) if float(s) <= 0]
        if len(native) != 1:
            return None
        spacing = np.linalg.norm(np.asarray(affine, dtype=float)[:3, :3], axis=0)
        coarse = int(np.argmax(spacing))
        if coarse == native[0] or spacing[coarse] < 2.0 * max(spacing[i] for i in range(3) if i != coarse):
            return None
        order = [i for i in range(3) if i != coarse]
        order.insert(native[0], coarse)
        return tuple(order)  # type: ignore[return-value]

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def label_values(self) -> list[int]:
        """Label values in class order: network output channel i is label value ``label_values[i]``. Values may
        have gaps (BraTS: 0, 1, 2, 4); files always carry the values, the network the class indices."""
        return sorted(self.labels)

    @property
    def class_names(self) -> list[str]:
        return [self.labels[v] for v in self.label_values]

    def values_to_classes(self, label: "Any") -> "Any":
        """A label array (values) as class indices; identity when the values are 0..K-1."""
        import numpy as np

        values = self.label_values
        if values == list(range(len(values))):
            return label
        lut = np.zeros(max(values) + 1, dtype=np.int64)
        lut[values] = np.arange(len(values))
        arr = np.asarray(label).astype(np.int64)
        return lut[np.clip(arr, 0, max(values))]

    def classes_to_values(self, classes: "Any") -> "Any":
        """Class indices (e.g. an argmax) as label values, uint8 or uint16."""
        import numpy as np

        values = np.asarray(self.label_values, dtype=np.uint8 if max(self.label_values) < 256 else np.uint16)
        return values[np.asarray(classes, dtype=np.int64)]

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
