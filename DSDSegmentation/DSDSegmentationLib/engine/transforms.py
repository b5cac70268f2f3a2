"""MONAI transform chains built from a task preset: loading, orientation, spacing, normalisation, augmentation."""

from __future__ import annotations

from typing import Any, Hashable, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    MapTransform,
    NormalizeIntensity,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRange,
    Spacingd,
    SpatialPadd,
)

from .errors import InputError
from .io import load_channels, load_volume
from .tasks import TaskPreset


class LoadCased(MapTransform):
    """Load ``image`` (list of channel files, or one 4D file) and optional ``label`` as MetaTensors with affines.

    The same loader serves validation, training and inference, so all three see identical arrays. An ``image``
    that is already a MetaTensor (inference loads and checks it once) is passed through.
    """

    def __init__(self, keys=("image", "label"), allow_missing_keys: bool = True):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if "image" in d and not isinstance(d["image"], MetaTensor):
            paths = d["image"] if isinstance(d["image"], (list, tuple)) else [d["image"]]
            img, affine = load_channels([str(p) for p in paths])
            d["image"] = MetaTensor(torch.from_numpy(img), affine=torch.as_tensor(affine, dtype=torch.float64),
                                    meta={"filename_or_obj": str(paths[0]), "original_affine": affine,
                                          "spatial_shape": np.array(img.shape[1:])})
        if d.get("label") and not isinstance(d["label"], MetaTensor):
            lab, affine = load_volume(d["label"], "label")
            if lab.ndim != 3:
                raise InputError(f"label {d['label']} must be 3D, got shape {lab.shape}")
            d["label"] = MetaTensor(torch.from_numpy(np.rint(np.asarray(lab, dtype=np.float32))[None]),
                                    affine=torch.as_tensor(affine, dtype=torch.float64),
                                    meta={"filename_or_obj": str(d["label"])})
        elif "label" in d and not d["label"]:
            d.pop("label")
        return d


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation from the preset: ``zscore`` (optionally over non-zero voxels),
    ``percentile`` (clip to per-volume percentiles, then z-score), ``ct_window`` (window to [0, 1]), ``none``."""

    def __init__(self, specs: list[dict[str, Any]], key: str = "image"):
        super().__init__([key])
        self.specs = specs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        out = img.clone()
        for c, spec in enumerate(self.specs):
            x = img[c]
            kind = spec["kind"]
            if kind == "zscore":
                x = NormalizeIntensity(nonzero=bool(spec.get("nonzero", False)))(x)
            elif kind == "percentile":
                lo, hi = np.percentile(x.numpy(), [spec.get("lower", 0.5), spec.get("upper", 99.5)])
                x = NormalizeIntensity()(torch.clamp(x, float(lo), float(hi)))
            elif kind == "ct_window":
                x = ScaleIntensityRange(spec["min"], spec["max"], 0.0, 1.0, clip=True)(x)
            out[c] = torch.as_tensor(x)
        d[self.keys[0]] = out
        return d


def preprocessing(preset: TaskPreset, with_label: bool = True) -> list:
    """Deterministic, invertible preprocessing shared by training, validation and inference."""
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    t: list = [LoadCased()]
    if preset.orientation:
        t.append(Orientationd(keys, axcodes=preset.orientation, labels=None))
    if preset.spacing:
        t.append(Spacingd(keys, pixdim=preset.spacing, mode=modes))
    t.append(NormalizeChannelsd(preset.normalization))
    if preset.crop_foreground:
        t.append(CropForegroundd(keys, source_key="image", allow_smaller=True))
    return t


def training_transforms(preset: TaskPreset, samples: int | None = None) -> tuple[Compose, Compose]:
    """(cached deterministic part, random part) for training."""
    tr = preset.training
    keys = ["image", "label"]
    cached = Compose([*preprocessing(preset), SpatialPadd(keys, spatial_size=preset.patch_size, mode="constant"),
                      EnsureTyped(keys, track_meta=False)])
    rot_axes = tuple(tr.get("rot90_axes", (0, 1)))
    random = Compose([
        RandCropByPosNegLabeld(keys, "label", spatial_size=preset.patch_size, pos=tr.get("pos", 1.0), neg=tr.get("neg", 1.0),
                               num_samples=samples or tr.get("samples_per_volume", 2)),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandRotate90d(keys, prob=0.25, spatial_axes=rot_axes) if preset.patch_size[rot_axes[0]] == preset.patch_size[rot_axes[1]] else Compose([]),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        EnsureTyped("label", dtype=torch.long),
    ])
    return cached, random


def validation_transforms(preset: TaskPreset) -> Compose:
    return Compose([*preprocessing(preset), EnsureTyped(["image", "label"], track_meta=False)])


def inference_transforms(preset: TaskPreset) -> Compose:
    return Compose(preprocessing(preset, with_label=False))
