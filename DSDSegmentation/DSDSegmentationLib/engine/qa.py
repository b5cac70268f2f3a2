"""Boundary quality assurance without Slicer: where two segmentations disagree, and by how much (mm).

``boundary_errors`` finds the worst boundary errors of one structure: points of the predicted boundary far outside
the reference (extra) and points of the reference boundary far from the prediction (missed), each with its
distance in millimetres, kept at least ``min_separation_mm`` apart so that one bad region yields one point.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from .metrics import union_box


def _boundary(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def signed_distance(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Signed distance (mm) to the boundary of ``mask``: negative inside, positive outside."""
    if not mask.any():
        return np.full(mask.shape, np.inf, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    return np.where(mask, -inside, outside).astype(np.float32)


def boundary_errors(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float], count: int = 5,
                    min_separation_mm: float = 5.0, min_error_mm: float | None = None) -> list[dict[str, Any]]:
    """The ``count`` worst boundary errors (voxel index, distance in mm, kind), worst first.

    ``extra``: a predicted boundary voxel outside the reference, ``distance_mm`` from the reference boundary.
    ``missed``: a reference boundary voxel the prediction does not cover, ``distance_mm`` from the predicted
    boundary. Errors below ``min_error_mm`` (default: the largest voxel spacing) are not reported.
    """
    p, r = pred.astype(bool), ref.astype(bool)
    if not p.any() and not r.any():
        return []
    # everything below happens within the bounding box of both plus a margin of 2 voxels: every boundary voxel of
    # either lies inside it, so the distances are the same as on the whole volume (a tumour's box is ~1/15 of it)
    box = union_box(p, r)
    found = _boundary_errors(p[box], r[box], spacing, count, min_separation_mm, min_error_mm)
    return [{**e, "ijk": [int(v) + b.start for v, b in zip(e["ijk"], box)]} for e in found]


def worst_first(errors: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    """The ``count`` worst of several structures' boundary errors: largest distance first, a structure missed
    entirely (distance None) before all."""
    return sorted(errors, key=lambda e: -(e["distance_mm"] if e["distance_mm"] is not None else np.inf))[:count]


def _boundary_errors(p: np.ndarray, r: np.ndarray, spacing: tuple[float, float, float], count: int,
                     min_separation_mm: float, min_error_mm: float | None) -> list[dict[str, Any]]:
    floor = max(spacing) if min_error_mm is None else min_error_mm
    candidates: list[tuple[float, tuple[int, int, int], str]] = []
    if r.any():
        d_ref = ndimage.distance_transform_edt(~_boundary(r), sampling=spacing)
        extra = _boundary(p) & ~r
        candidates += [(float(d_ref[i]), tuple(int(v) for v in i), "extra") for i in zip(*np.nonzero(extra))]
    if p.any():
        d_pred = ndimage.distance_transform_edt(~_boundary(p), sampling=spacing)
        missed = _boundary(r) & ~p
        candidates += [(float(d_pred[i]), tuple(int(v) for v in i), "missed") for i in zip(*np.nonzero(missed))]
    else:  # nothing predicted: the whole reference is missed; report its centre
        centre = tuple(int(round(c)) for c in ndimage.center_of_mass(r))
        return [{"ijk": list(centre), "distance_mm": None, "kind": "missed"}]
    candidates.sort(key=lambda c: -c[0])
    chosen: list[dict[str, Any]] = []
    sp = np.asarray(spacing)
    for dist, ijk, kind in candidates:
        if dist < floor or len(chosen) >= count:
            break
        if all(np.linalg.norm((np.asarray(ijk) - np.asarray(c["ijk"])) * sp) >= min_separation_mm for c in chosen):
            chosen.append({"ijk": list(ijk), "distance_mm": round(dist, 3), "kind": kind})
    return chosen


def uncertainty_scores(uncertainty: np.ndarray, labels: np.ndarray, names: dict[int, str]) -> dict[str, float | None]:
    """Mean uncertainty per structure over its voxels and a one-voxel band around them (where errors live)."""
    out: dict[str, float | None] = {}
    for value, name in sorted(names.items()):
        if value == 0:
            continue
        m = labels == value
        out[name] = float(uncertainty[ndimage.binary_dilation(m)].mean()) if m.any() else None
    return out
