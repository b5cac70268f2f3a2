"""Datasets: locating them, listing cases (MSD, nnU-Net raw, plain lists), validating them, splitting by patient."""

from __future__ import annotations

import csv
import os
import random
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .errors import InputError, read_json

DATA_ENV = "DSDSEG_DATA"
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".mhd")


def find_shared_data() -> Path:
    """The folder holding the project's shared datasets.

    Order: ``$DSDSEG_DATA``; ``../shared/data`` beside the working directory or beside the repository.
    """
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[3]
    candidates += [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise InputError(
        "no dataset folder found: set $DSDSEG_DATA or place the data in ../shared/data "
        f"(looked in: {', '.join(str(c) for c in candidates)})"
    )


@dataclass
class Case:
    """One training case: image file(s) — one per channel, or one 4D file — a label file and a patient key."""

    id: str
    images: list[str]
    label: str | None
    patient: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def strip_suffix(name: str) -> str:
    for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return name[: -len(s)]
    return Path(name).stem


def _channel_files(stem_path: Path, n: int | None) -> list[Path]:
    """``<stem>_0000.nii.gz``, ``<stem>_0001.nii.gz``, ... next to ``stem_path`` (nnU-Net naming)."""
    stem = strip_suffix(stem_path.name)
    found = []
    for i in range(n if n else 100):
        hits = [stem_path.parent / f"{stem}_{i:04d}{s}" for s in IMAGE_SUFFIXES]
        hit = next((h for h in hits if h.is_file()), None)
        if hit is None:
            break
        found.append(hit)
    return found


def _msd_cases(root: Path, meta: dict[str, Any]) -> list[Case]:
    n_channels = len(meta.get("modality") or meta.get("channel_names") or {}) or None
    cases = []
    for e in meta.get("training", []):
        if isinstance(e.get("image"), list):  # one file per channel, listed
            images = [root / p for p in e["image"]]
            missing = [str(p) for p in images if not p.is_file()]
            cid = re.sub(r"_\d{4}$", "", strip_suffix(images[0].name)) if images else "?"
            if not images or missing:
                raise InputError(f"case {cid}: channel file(s) listed in dataset.json are missing: {', '.join(missing) or 'none listed'}")
            label = root / e["label"] if e.get("label") else None
            cases.append(Case(cid, [str(p) for p in images], str(label) if label else None, str(e.get("patient", cid))))
            continue
        image = root / e["image"]
        cid = strip_suffix(image.name)
        if image.is_file():
            images = [image]
        else:
            images = _channel_files(image, n_channels)
            if not images:
                raise InputError(f"case {cid}: image {image} (or {cid}_0000...) listed in dataset.json is missing")
        label = root / e["label"] if e.get("label") else None
        cases.append(Case(cid, [str(p) for p in images], str(label) if label else None, str(e.get("patient", cid))))
    return cases


def _nnunet_cases(root: Path, meta: dict[str, Any]) -> list[Case]:
    ending = meta.get("file_ending", ".nii.gz")
    n_channels = len(meta["channel_names"])
    labels_dir = root / "labelsTr"
    if not labels_dir.is_dir():
        raise InputError(f"{root}: nnU-Net dataset without a labelsTr folder")
    cases = []
    for lab in sorted(labels_dir.glob(f"*{ending}")):
        cid = lab.name[: -len(ending)]
        images = [root / "imagesTr" / f"{cid}_{i:04d}{ending}" for i in range(n_channels)]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise InputError(f"case {cid}: channel file(s) missing: {', '.join(missing)}")
        cases.append(Case(cid, [str(p) for p in images], str(lab), cid))
    return cases


def _list_cases(path: Path) -> list[Case]:
    rows: list[dict[str, Any]]
    if path.suffix == ".json":
        rows = read_json(path)
        if isinstance(rows, dict):
            rows = rows.get("training", [])
    else:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    cases = []
    for i, r in enumerate(rows):
        if "image" not in r:
            raise InputError(f"{path}: entry {i + 1} has no 'image'")
        imgs = r["image"] if isinstance(r["image"], list) else [s for s in str(r["image"]).split(";") if s]
        imgs = [str((path.parent / p) if not Path(p).is_absolute() else Path(p)) for p in imgs]
        lab = r.get("label") or None
        if lab and not Path(lab).is_absolute():
            lab = str(path.parent / lab)
        cid = str(r.get("id") or strip_suffix(Path(imgs[0]).name))
        cases.append(Case(cid, imgs, lab, str(r.get("patient") or cid)))
    return cases


def dataset_channels(source: str | Path) -> list[str] | None:
    """Channel names of a dataset folder's dataset.json (MSD ``modality`` or nnU-Net ``channel_names``), or None."""
    meta_path = Path(source) / "dataset.json"
    if not meta_path.is_file():
        return None
    meta = read_json(meta_path)
    names = meta.get("modality") or meta.get("channel_names")
    if not isinstance(names, dict) or not names:
        return None
    return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]


def select_channels(cases: list[Case], available: list[str] | None, wanted: list[str], source: str | Path) -> list[Case]:
    """Keep the channels a task needs, by name, when the dataset has more (e.g. FLAIR + T1c out of four BraTS
    sequences). Names match case-insensitively; a missing one is an error naming what the dataset has."""
    if not available or len(available) == len(wanted) and [a.lower() for a in available] == [w.lower() for w in wanted]:
        return cases
    low = [a.lower() for a in available]
    missing = [w for w in wanted if w.lower() not in low]
    if missing:
        if len(available) == len(wanted):
            return cases  # same count, other names (e.g. "MRI" for "T1 MRI"): channels are taken in order
        raise InputError(f"{source}: the task needs channel(s) {wanted}; the dataset has {available} (missing {missing})")
    idx = [low.index(w.lower()) for w in wanted]
    out = []
    for c in cases:
        if len(c.images) != len(available):
            raise InputError(f"case {c.id}: {len(c.images)} image file(s) for the dataset's {len(available)} channels "
                             f"{available}; channels can only be selected from one file per channel")
        out.append(Case(c.id, [c.images[i] for i in idx], c.label, c.patient))
    return out


def list_cases(source: str | Path, limit: int | None = None, channels: list[str] | None = None) -> list[Case]:
    """Cases of a dataset folder (MSD or nnU-Net raw ``dataset.json``) or of a list file (.json / .csv).

    List files hold ``image`` (one path, a list, or ``a;b`` for channels), ``label`` and optional ``patient``.
    With ``channels`` (a task's channel names), a dataset folder with more, named channels gives only those.
    """
    source = Path(source)
    if source.is_file():
        cases = _list_cases(source)
    else:
        meta_path = source / "dataset.json"
        if not meta_path.is_file():
            raise InputError(f"{source} has no dataset.json (expected an MSD or nnU-Net dataset folder, or a .json/.csv list)")
        meta = read_json(meta_path)
        cases = _nnunet_cases(source, meta) if "channel_names" in meta and "file_ending" in meta else _msd_cases(source, meta)
    if not cases:
        raise InputError(f"{source} lists no training cases")
    ids = [c.id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise InputError(f"{source}: duplicate case id(s) {dup[:5]}")
    cases.sort(key=lambda c: c.id)
    if channels is not None and not source.is_file():
        cases = select_channels(cases, dataset_channels(source), list(channels), source)
    return cases[:limit] if limit else cases


def dataset_labels(source: str | Path) -> dict[int, str] | None:
    """The ``labels`` of a dataset.json (MSD: value→name; nnU-Net: name→value), or None."""
    meta_path = Path(source) / "dataset.json"
    if not meta_path.is_file():
        return None
    labels = read_json(meta_path).get("labels")
    if not labels:
        return None
    if all(re.fullmatch(r"\d+", str(k)) for k in labels):
        return {int(k): str(v) for k, v in labels.items()}
    return {int(v): str(k) for k, v in labels.items() if isinstance(v, int)}


def validate_case(case: Case, n_channels: int, labels: Iterable[int]) -> dict[str, Any]:
    """Load a case as training will and check it; raise :class:`InputError` naming the case and the problem.

    Checks: files exist and load; channel count; every channel and the label on the same grid (shape and
    affine); finite, non-constant image intensities; label values integral and within ``labels``.
    """
    from .io import load_channels, load_volume

    allowed = set(int(v) for v in labels)
    for p in [*case.images, *([case.label] if case.label else [])]:
        if not Path(p).is_file():
            raise InputError(f"case {case.id}: file {p} does not exist")
    image, affine = load_channels(case.images, what=f"case {case.id}")
    if image.shape[0] != n_channels:
        raise InputError(f"case {case.id}: {image.shape[0]} image channel(s), the task expects {n_channels}")
    from .inference import check_geometry

    check_geometry(affine, f"case {case.id}")
    if not np.all(np.isfinite(image)):
        raise InputError(f"case {case.id}: the image contains NaN or infinite values")
    for c in range(image.shape[0]):
        if float(image[c].max()) == float(image[c].min()):
            raise InputError(f"case {case.id}: channel {c} has constant intensity {float(image[c].min())}")
    info: dict[str, Any] = {"id": case.id, "shape": list(image.shape[1:]), "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]}
    if case.label:
        label, lab_affine = load_volume(case.label, what=f"case {case.id} label")
        if label.ndim != 3:
            raise InputError(f"case {case.id}: label must be 3D, got shape {label.shape}")
        if tuple(label.shape) != tuple(image.shape[1:]):
            raise InputError(f"case {case.id}: label shape {tuple(label.shape)} differs from image shape {tuple(image.shape[1:])}")
        if not np.allclose(lab_affine, affine, atol=1e-3):
            raise InputError(f"case {case.id}: label and image have different geometry (affine)\n{lab_affine}\nvs\n{affine}")
        if not np.all(np.isfinite(label)) or not np.allclose(label, np.round(label)):
            raise InputError(f"case {case.id}: label has non-integer values")
        values = set(np.unique(label).astype(int).tolist())
        if not values <= allowed:
            raise InputError(f"case {case.id}: label values {sorted(values - allowed)} are not among the task's labels {sorted(allowed)}")
        info["label_values"] = sorted(values)
    return info


def split_by_patient(cases: list[Case], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """Deterministic train/validation split that keeps all cases of one patient on the same side."""
    patients = sorted({c.patient for c in cases})
    if len(patients) < 2:
        raise InputError(f"at least 2 patients are needed to hold one out for validation, got {len(patients)}")
    rng = random.Random(seed)
    rng.shuffle(patients)
    n_val = min(len(patients) - 1, max(1, round(val_fraction * len(patients))))
    val_p = set(patients[:n_val])
    return [c for c in cases if c.patient not in val_p], [c for c in cases if c.patient in val_p]
