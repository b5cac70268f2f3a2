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
        return np.asanyarray(img.dataobj), nifti_affine(img, path)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise InputError(f"{what}: cannot read {path}: {e}") from e


class GeometryWarning(UserWarning):
    """A file's geometry was read by a documented rule other than its header's affine."""


def nifti_affine(img, path: str | Path = "") -> np.ndarray:
    """The voxel→RAS affine of a NIfTI image, with one documented exception (the "unit-sform rule").

    Some datasets (ACDC) store an sform whose axes all have length 1 mm while ``pixdim`` holds the true voxel
    size (e.g. 1.56 × 1.56 × 10 mm) and the qform is unset. Read as stored, such a volume would be 1 mm isotropic
    in physical space and a model would learn voxel units. The rule: when the header's affine has unit-length
    axes, no valid qform says otherwise (qform_code 0, or a qform with the same unit axes), and ``pixdim[1:4]``
    differs from 1 by more than 1 %, the axes are scaled to ``pixdim`` (directions and origin kept) and a
    :class:`GeometryWarning` names the file. Every other file keeps its header's affine.
    """
    import warnings

    affine = np.asarray(img.affine, dtype=float)
    header = img.header
    try:
        pixdim = np.asarray(header["pixdim"][1:4], dtype=float)
        qcode = int(header["qform_code"])
    except (KeyError, TypeError, ValueError):
        return affine
    norms = np.linalg.norm(affine[:3, :3], axis=0)
    if not np.allclose(norms, 1.0, atol=1e-4) or not np.all(pixdim > 0):
        return affine
    if qcode > 0 and not np.allclose(np.linalg.norm(header.get_qform()[:3, :3], axis=0), 1.0, atol=1e-4):
        return affine  # a valid qform disagrees with the sform: nibabel's choice (the sform) stands
    if np.allclose(pixdim, 1.0, rtol=0.01):
        return affine
    fixed = affine.copy()
    fixed[:3, :3] = affine[:3, :3] * pixdim[None, :]
    warnings.warn(f"{Path(path).name}: the header's affine has 1 mm axes but pixdim says "
                  f"{' x '.join(f'{v:g}' for v in pixdim)} mm; using pixdim (unit-sform rule)", GeometryWarning,
                  stacklevel=3)
    return fixed


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


def load_channels(paths: list[str], what: str = "image", resample: bool = False,
                  notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Channel-first float32 array (C, x, y, z) and affine from one 3D/4D file or one 3D file per channel.

    Channels on a different grid than the first are an error, or with ``resample`` are resampled (linear) onto
    the first channel's grid, which is then noted in ``notes``.
    """
    arrays, affine, shape = [], None, None
    for p in paths:
        data, aff = load_volume(p, what)
        if data.ndim == 4 and len(paths) == 1:
            chans = [data[..., i] for i in range(data.shape[3])]
        elif data.ndim == 3:
            chans = [data]
        else:
            raise InputError(f"{what}: {p} has shape {data.shape}; expected a 3D volume (or one 4D multi-channel file)")
        if affine is None:
            affine, shape = aff, chans[0].shape
        elif chans[0].shape != shape or not np.allclose(aff, affine, atol=1e-3):
            if not resample:
                raise InputError(f"{what}: channel {Path(p).name} has a different geometry (shape or affine) from the "
                                 f"first channel {Path(paths[0]).name}")
            chans = [_resample_onto(chans[0], aff, affine, shape)]
            if notes is not None:
                notes.append(f"{Path(p).name} was resampled onto the grid of {Path(paths[0]).name}")
        arrays += chans
    image = np.stack([np.asarray(a, dtype=np.float32) for a in arrays])
    assert affine is not None
    return image, affine


def permute_axes(image: np.ndarray, affine: np.ndarray, order: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A channel-first (C, x, y, z) or 3D array with its spatial axes in ``order`` (new axis t = old axis
    ``order[t]``) and the affine that keeps every voxel where it was in space."""
    move = np.eye(4)
    move[:3, :3] = 0.0
    for new, old in enumerate(order):
        move[old, new] = 1.0  # old voxel index = move @ new voxel index
    axes = tuple(order) if image.ndim == 3 else (0, *(o + 1 for o in order))
    return np.ascontiguousarray(image.transpose(axes)), np.asarray(affine, dtype=float) @ move


def _resample_onto(data: np.ndarray, affine: np.ndarray, target_affine: np.ndarray, target_shape: tuple) -> np.ndarray:
    """Linear resampling of ``data`` (voxel→RAS ``affine``) onto a target grid; outside is the minimum value."""
    from scipy.ndimage import affine_transform

    m = np.linalg.inv(affine) @ target_affine  # target voxel -> source voxel
    return affine_transform(np.asarray(data, dtype=np.float32), m[:3, :3], offset=m[:3, 3], output_shape=target_shape,
                            order=1, mode="constant", cval=float(np.min(data)))


def save_labelmap(labels: np.ndarray, affine: np.ndarray, path: str | Path, reference: str | Path | None = None) -> Path:
    """Write an integer labelmap atomically as .nii/.nii.gz (reference header kept) or .nrrd / .seg.nrrd."""
    dtype = np.uint8 if labels.max(initial=0) < 256 else np.uint16
    return save_image(labels.astype(dtype), affine, path, reference)


def save_image(data: np.ndarray, affine: np.ndarray, path: str | Path, reference: str | Path | None = None) -> Path:
    """Write a 3D array (its own dtype, e.g. a float32 uncertainty map) atomically, like :func:`save_labelmap`.

    A failed write (full disk, read-only folder) is an :class:`InputError` naming the file; no partial or
    temporary file is left. The file gets the permissions of the user's umask."""
    from .outputs import LABEL_SUFFIXES, apply_umask, has_suffix, write_error

    path = Path(path)
    if not has_suffix(path, LABEL_SUFFIXES):
        raise InputError(f"{path}: unsupported file type; the name must end in {', '.join(LABEL_SUFFIXES)}")
    if path.is_dir():
        raise InputError(f"{path} is an existing folder, not a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="".join(path.suffixes[-2:]), dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise write_error(path, e) from e
    dtype = data.dtype
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
        apply_umask(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
