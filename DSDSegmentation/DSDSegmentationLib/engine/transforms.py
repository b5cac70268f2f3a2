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
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandGaussianNoised,
    RandGaussianSmoothd,
    Randomizable,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRange,
    Spacingd,
    SpatialPadd,
)

from .errors import InputError
from .io import load_channels, load_volume, permute_axes
from .tasks import TaskPreset


class LoadCased(MapTransform):
    """Load ``image`` (list of channel files, or one 4D file) and optional ``label`` as MetaTensors with affines.

    The same loader serves validation, training and inference, so all three see identical arrays. An ``image``
    that is already a MetaTensor (inference loads and checks it once) is passed through.
    """

    def __init__(self, keys=("image", "label"), allow_missing_keys: bool = True, preset: TaskPreset | None = None):
        super().__init__(keys, allow_missing_keys)
        self.preset = preset  # label values → class indices (values with gaps, e.g. BraTS 0, 1, 2, 4)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        order = None  # a stack with its slices along another axis than the preset's slice axis: brought there
        if "image" in d and not isinstance(d["image"], MetaTensor):
            paths = d["image"] if isinstance(d["image"], (list, tuple)) else [d["image"]]
            img, affine = load_channels([str(p) for p in paths])
            order = self.preset.slice_axis_order(affine) if self.preset is not None else None
            if order is not None:
                img, affine = permute_axes(img, affine, order)
            d["image"] = MetaTensor(torch.from_numpy(img), affine=torch.as_tensor(affine, dtype=torch.float64),
                                    meta={"filename_or_obj": str(paths[0]), "original_affine": affine,
                                          "spatial_shape": np.array(img.shape[1:])})
        if d.get("label") and not isinstance(d["label"], MetaTensor):
            lab, affine = load_volume(d["label"], "label")
            if lab.ndim != 3:
                raise InputError(f"label {d['label']} must be 3D, got shape {lab.shape}")
            lab = np.rint(np.asarray(lab, dtype=np.float32))
            if order is None and self.preset is not None and "image" not in data:
                order = self.preset.slice_axis_order(affine)
            if order is not None:
                lab, affine = permute_axes(lab, affine, order)
            if self.preset is not None:
                lab = self.preset.values_to_classes(lab).astype(np.float32)
            d["label"] = MetaTensor(torch.from_numpy(lab[None]),
                                    affine=torch.as_tensor(affine, dtype=torch.float64),
                                    meta={"filename_or_obj": str(d["label"])})
        elif "label" in d and not d["label"]:
            d.pop("label")
        return d


BACKGROUND_MIN_FRACTION = 0.1  # a minimum held by at least this share of the voxels is a constant background


def constant_background(x: torch.Tensor | np.ndarray) -> float | None:
    """The value of a channel's constant background: its minimum, when at least ``BACKGROUND_MIN_FRACTION`` of
    the voxels hold exactly that value (0 in most skull-stripped scans, -3.6 in an already z-scored one); None
    when there is none (e.g. a head with noisy air around it)."""
    t = torch.as_tensor(x)
    lo = t.min()
    return float(lo) if float((t == lo).float().mean()) >= BACKGROUND_MIN_FRACTION else None


class ZeroBackgroundd(MapTransform):
    """For channels normalised over their non-zero voxels (skull-stripped MRI): a constant background that is not 0
    (the minimum of a scan someone already z-scored, as in the BraTS 2015 sample) becomes 0 first, so the
    statistics come from the brain, as in training; runs before any resampling blurs the background's edge.
    A background that is already 0 is left as it is (no change for such scans)."""

    def __init__(self, specs: list[dict[str, Any]], key: str = "image"):
        super().__init__([key])
        self.channels = [c for c, spec in enumerate(specs) if spec.get("nonzero")]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        img = d[self.keys[0]]
        out = None
        for c in self.channels:
            bg = constant_background(img[c])
            if bg is None or bg == 0:
                continue
            if out is None:
                out = img.clone()
            out[c] = torch.where(torch.as_tensor(img[c]) == bg, torch.zeros((), dtype=out.dtype), torch.as_tensor(img[c]))
        if out is not None:
            d[self.keys[0]] = out
        return d


def _percentile_zscore(x: torch.Tensor, lower: float, upper: float, nonzero: bool) -> torch.Tensor:
    """Clip to the ``lower``/``upper`` percentiles, then z-score. With ``nonzero`` both statistics come from the
    non-zero voxels only and zeros stay 0: the result does not depend on how much empty background (skull
    stripping, padding at the volume's border) the crop holds."""
    if not nonzero:
        lo, hi = np.percentile(x.numpy(), [lower, upper])
        return NormalizeIntensity()(torch.clamp(x, float(lo), float(hi)))
    x = x.float()
    mask = x != 0
    if int(mask.sum()) < 2:
        return torch.zeros_like(x)
    v = x[mask].numpy()
    lo, hi = np.percentile(v, [lower, upper])
    c = np.clip(v, lo, hi)
    sd = float(c.std())
    out = torch.zeros_like(x)
    out[mask] = torch.from_numpy(((c - c.mean()) / (sd if sd > 0 else 1.0)).astype(np.float32))
    return out


class NormalizeChannelsd(MapTransform):
    """Per-channel intensity normalisation from the preset: ``zscore`` (optionally over non-zero voxels),
    ``percentile`` (clip to per-volume percentiles, then z-score; optionally over non-zero voxels, zeros kept),
    ``ct_window`` (window to [0, 1]), ``none``."""

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
                x = _percentile_zscore(x, spec.get("lower", 0.5), spec.get("upper", 99.5), bool(spec.get("nonzero", False)))
            elif kind == "ct_window":
                x = ScaleIntensityRange(spec["min"], spec["max"], 0.0, 1.0, clip=True)(x)
            out[c] = torch.as_tensor(x)
        d[self.keys[0]] = out
        return d


def preprocessing(preset: TaskPreset, with_label: bool = True) -> list:
    """Deterministic, invertible preprocessing shared by training, validation and inference."""
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    t: list = [LoadCased(preset=preset)]
    if any(spec.get("nonzero") for spec in preset.normalization):
        t.append(ZeroBackgroundd(preset.normalization))
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
    rot_axes = tuple(tr["rot90_axes"])
    random = Compose([
        RandCropByPosNegLabeld(keys, "label", spatial_size=preset.patch_size, pos=tr["pos"], neg=tr["neg"],
                               num_samples=samples or tr["samples_per_volume"]),
        *_spatial_augment(preset, rot_axes),
        RandFlipd(keys, prob=0.5, spatial_axis=0),
        RandFlipd(keys, prob=0.5, spatial_axis=1),
        RandFlipd(keys, prob=0.5, spatial_axis=2),
        RandRotate90d(keys, prob=0.25, spatial_axes=rot_axes) if preset.patch_size[rot_axes[0]] == preset.patch_size[rot_axes[1]] else Compose([]),
        *_intensity_augment(preset),
        *([RandBackgroundSlabd(prob=tr["augment"]["background"])] if tr["augment"]["background"] else []),
        RandScaleIntensityd("image", factors=0.1, prob=0.5),
        RandShiftIntensityd("image", offsets=0.1, prob=0.5),
        EnsureTyped("label", dtype=torch.long),
    ])
    return cached, random


def _spatial_augment(preset: TaskPreset, plane: tuple[int, ...]) -> list:
    """Rotation and scaling in the plane of ``rot90_axes`` (in-plane for anisotropic cine MRI) and single-slice
    shifts along the last axis (breath-hold misalignment), from the preset's ``training.augment``."""
    aug = preset.training["augment"]
    keys = ["image", "label"]
    out: list = []
    if aug["rotate_deg"] or aug["scale"]:
        rng = [0.0, 0.0, 0.0]
        scale = [0.0, 0.0, 0.0]
        if isotropic(preset):  # a 3D isotropic grid: rotate about every axis, scale along every axis
            rng = [float(np.deg2rad(aug["rotate_deg"]))] * 3
            scale = [aug["scale"]] * 3
        else:
            normal = ({0, 1, 2} - set(plane)).pop()
            rng[normal] = np.deg2rad(aug["rotate_deg"])  # rotation about the axis normal to the plane
            for a in plane:
                scale[a] = aug["scale"]
        out.append(RandAffined(keys, prob=max(aug["prob"], 0.3), rotate_range=rng, scale_range=scale,
                               mode=["bilinear", "nearest"], padding_mode="zeros"))
    if aug["slice_shift"]:
        out.append(RandSliceShiftd(keys, max_shift=aug["slice_shift"], prob=aug["prob"]))
    return out


def _intensity_augment(preset: TaskPreset) -> list:
    """Scanner / sequence shift on the normalised image: bias field, gamma, blur, noise."""
    aug = preset.training["augment"]
    p = aug["prob"]
    out: list = []
    if aug["bias_field"]:
        out.append(RandBiasFieldd("image", coeff_range=(0.0, aug["bias_field"]), degree=3, prob=p))
    if aug["gamma"]:
        g = float(aug["gamma"])
        out.append(RandAdjustContrastd("image", gamma=(float(np.exp(-g)), float(np.exp(g))), prob=p))
    if aug["blur"]:
        s = (0.25, float(aug["blur"]))
        out.append(RandGaussianSmoothd("image", sigma_x=s, sigma_y=s, sigma_z=s, prob=p))
    if aug["noise"]:
        out.append(RandGaussianNoised("image", std=float(aug["noise"]), prob=p))
    return out


def isotropic(preset: TaskPreset) -> bool:
    """The preset resamples to one spacing on all three axes (then rotations/scaling are 3D)."""
    sp = preset.spacing
    return bool(sp) and len(sp) == 3 and all(float(v) > 0 for v in sp) and max(sp) - min(sp) < 1e-6


class RandBackgroundSlabd(Randomizable):
    """Zero the image beyond a random plane that does not cut the foreground: what a crop of a skull-stripped
    head or a crop at the border of the volume looks like (0 = no data once a ``nonzero`` normalisation ran).
    Labels are untouched (the structure is never in the zeroed part)."""

    def __init__(self, prob: float, image: str = "image", label: str = "label"):
        self.prob, self.image, self.label = prob, image, label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.R.rand() >= self.prob:
            return d
        img, lab = d[self.image], d.get(self.label)
        axis = int(self.R.randint(3))
        n = img.shape[1 + axis]
        fg = torch.nonzero(torch.as_tensor(lab)[0] > 0) if lab is not None else torch.zeros((0, 3))
        lo, hi = (int(fg[:, axis].min()), int(fg[:, axis].max()) + 1) if len(fg) else (n // 2, n // 2)
        if self.R.rand() < 0.5:  # zero [0, cut) with cut <= lo
            if lo < 1:
                return d
            cut = int(self.R.randint(1, lo + 1))
            index = [slice(None)] * 4
            index[1 + axis] = slice(0, cut)
        else:  # zero [cut, n) with cut >= hi
            if hi > n - 1:
                return d
            cut = int(self.R.randint(hi, n))
            index = [slice(None)] * 4
            index[1 + axis] = slice(cut, n)
        img = img.clone()
        img[tuple(index)] = 0
        d[self.image] = img
        return d


class RandSliceShiftd(MapTransform, Randomizable):
    """Shift one random slice (last axis) in-plane by up to ``max_shift`` voxels, image and label together."""

    def __init__(self, keys, max_shift: float, prob: float):
        MapTransform.__init__(self, keys)
        self.max_shift = int(round(max_shift))
        self.prob = prob

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        first = d[self.keys[0]]
        nz = first.shape[-1]
        if self.max_shift < 1 or nz < 2 or self.R.rand() >= self.prob:
            return d
        z = int(self.R.randint(nz))
        dx, dy = (int(v) for v in self.R.randint(-self.max_shift, self.max_shift + 1, size=2))
        for k in self.keys:
            t = d[k]
            t[..., z] = torch.roll(t[..., z], shifts=(dx, dy), dims=(-2, -1))
            d[k] = t
        return d


def validation_transforms(preset: TaskPreset) -> Compose:
    return Compose([*preprocessing(preset), EnsureTyped(["image", "label"], track_meta=False)])


def inference_transforms(preset: TaskPreset) -> Compose:
    return Compose(preprocessing(preset, with_label=False))
