"""Reading and writing volumes (NIfTI, NRRD) with their geometry as a RAS affine (nibabel / pynrrd)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _is_nrrd(path: str | Path) -> bool:
    return str(path).lower().endswith((".nrrd", ".nhdr"))


def load_volume(path: str | Path, what: str = "volume") -> tuple[np.ndarray, np.ndarray]:
    """Array (as stored: x, y, z[, c]) and its voxel-to-RAS affine. Raises InputError for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what}: file {path} does not exist")
    try:
        if _is_nrrd(path):
            import nrrd

            data, header = nrrd.read(str(path))
            return np.asarray(data), _nrrd_affine(header, data.ndim)
        import nibabel as nib

        img = nib.load(str(path))
        return np.asanyarray(img.dataobj), np.asarray(img.affine, dtype=float)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(f"{what}: cannot read {path}: {e}") from e


def _nrrd_affine(header: dict, ndim: int) -> np.ndarray:
    space = str(header.get("space", "left-posterior-superior")).lower()
    dirs = header.get("space directions")
    origin = header.get("space origin")
    if dirs is None or origin is None:
        raise InputError("NRRD without 'space directions' / 'space origin': geometry unknown")
    rows = [np.asarray(d, dtype=float) for d in dirs if d is not None and not np.any(np.isnan(np.asarray(d, dtype=float)))]
    affine = np.eye(4)
    affine[:3, :3] = np.stack(rows[:3], axis=1)
    affine[:3, 3] = np.asarray(origin, dtype=float)
    if space in ("left-posterior-superior", "lps"):
        affine = LPS_TO_RAS @ affine
    elif space not in ("right-anterior-superior", "ras"):
        raise InputError(f"NRRD space '{space}' is not supported (use RAS or LPS)")
    return affine


def load_channels(paths: list[str], what: str = "image") -> tuple[np.ndarray, np.ndarray]:
    """Channel-first float32 array (C, x, y, z) and affine from one 3D/4D file or one 3D file per channel."""
    arrays, affine = [], None
    for p in paths:
        data, aff = load_volume(p, what)
        if data.ndim == 4 and len(paths) == 1:
            arrays += [data[..., i] for i in range(data.shape[3])]
        elif data.ndim == 3:
            arrays.append(data)
        else:
            raise InputError(f"{what}: {p} has shape {data.shape}; expected a 3D volume (or one 4D multi-channel file)")
        if affine is None:
            affine = aff
        elif not np.allclose(aff, affine, atol=1e-3):
            raise InputError(f"{what}: channel {p} has a different geometry (affine) from the first channel")
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise InputError(f"{what}: channels have different shapes {sorted(shapes)}")
    image = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
    assert affine is not None
    return image, affine


def save_labelmap(labels: np.ndarray, affine: np.ndarray, path: str | Path, reference: str | Path | None = None) -> Path:
    """Write an integer labelmap atomically as .nii/.nii.gz (reference header kept) or .nrrd / .seg.nrrd."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    data = labels.astype(dtype)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="".join(path.suffixes), dir=path.parent)
    os.close(fd)
    try:
        if _is_nrrd(path):
            import nrrd

            lps = LPS_TO_RAS @ affine
            header = {
                "space": "left-posterior-superior",
                "space directions": lps[:3, :3].T.tolist(),
                "space origin": lps[:3, 3].tolist(),
                "kinds": ["domain", "domain", "domain"],
                "encoding": "gzip",
            }
            nrrd.write(tmp, data, header, index_order="F")
        else:
            import nibabel as nib

            header = None
            if reference is not None and not _is_nrrd(reference):
                header = nib.load(str(reference)).header.copy()
                header.set_data_dtype(dtype)
                header.set_slope_inter(1, 0)
            img = nib.Nifti1Image(data, affine, header=header)
            img.set_qform(affine, code=1)
            img.set_sform(affine, code=1)
            nib.save(img, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
