"""Segmentation metrics in millimetres: Dice, HD95 and average symmetric surface distance (ASSD), per class.

Empty structures are defined explicitly (MONAI would return NaN/inf):
- reference and prediction both empty: Dice 1, HD95 0, ASSD 0 (``empty: "both"``);
- exactly one of them empty: Dice 0, HD95 and ASSD undefined (None in JSON, NaN in CSV), ``empty: "reference"``
  or ``"prediction"``; such values are left out of distance means and counted instead.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import load_volume


def union_box(*masks: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of all non-empty ``masks`` (boolean, same shape) grown by ``margin`` voxels and clipped to
    the grid: boundaries, and distances between them, are the same within it as on the whole grid."""
    both = np.logical_or.reduce([np.asarray(m, bool) for m in masks])
    box = []
    for axis in range(both.ndim):
        hit = np.flatnonzero(both.any(axis=tuple(a for a in range(both.ndim) if a != axis)))
        box.append(slice(max(int(hit[0]) - margin, 0), int(hit[-1]) + margin + 1) if hit.size else slice(0, 0))
    return tuple(box)


def class_metrics(pred: np.ndarray, ref: np.ndarray, spacing: tuple[float, float, float],
                  tolerance_mm: float = 1.0) -> dict[str, Any]:
    """Metrics of one binary structure (boolean arrays of equal shape): Dice, HD95 and ASSD (mm), volumes and their
    difference (ml, and % of the reference), and surface Dice at ``tolerance_mm`` (share of both boundaries within
    the tolerance of the other, MONAI's definition)."""
    p, r = pred.astype(bool), ref.astype(bool)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    vp, vr = float(p.sum()) * voxel_ml, float(r.sum()) * voxel_ml
    out: dict[str, Any] = {"volume_pred_ml": vp, "volume_ref_ml": vr, "volume_diff_ml": vp - vr,
                           "volume_diff_pct": 100.0 * (vp - vr) / vr if vr > 0 else None, "tolerance_mm": tolerance_mm}
    if not p.any() and not r.any():
        return {**out, "dice": 1.0, "hd95": 0.0, "assd": 0.0, "surface_dice": 1.0, "empty": "both"}
    if not p.any() or not r.any():
        return {**out, "dice": 0.0, "hd95": None, "assd": None, "surface_dice": 0.0,
                "empty": "prediction" if not p.any() else "reference"}
    inter = np.logical_and(p, r).sum()
    dice = 2.0 * inter / (p.sum() + r.sum())
    box = union_box(p, r)  # distances within the box of both are those on the whole grid, at a fraction of the cost
    p, r = p[box], r[box]
    import torch  # here, not at the top: ``union_box`` is used where torch must not load (Slicer's own process)
    from monai.metrics import compute_average_surface_distance, compute_hausdorff_distance, compute_surface_dice

    pt = torch.from_numpy(p)[None, None]
    rt = torch.from_numpy(r)[None, None]
    with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = float(compute_hausdorff_distance(pt, rt, include_background=True, percentile=95, spacing=list(spacing))[0, 0])
        assd = float(compute_average_surface_distance(pt, rt, include_background=True, symmetric=True, spacing=list(spacing))[0, 0])
        nsd = float(compute_surface_dice(torch.stack([~pt[0, 0], pt[0, 0]])[None].float(),
                                         torch.stack([~rt[0, 0], rt[0, 0]])[None].float(), class_thresholds=[tolerance_mm],
                                         include_background=False, spacing=list(spacing))[0, 0])
    return {**out, "dice": float(dice), "hd95": hd95, "assd": assd, "surface_dice": nsd, "empty": None}


def case_metrics(pred: np.ndarray, ref: np.ndarray, labels: dict[int, str], spacing: tuple[float, float, float],
                 tolerance_mm: float = 1.0, regions: dict[str, list[int]] | None = None) -> dict[str, dict[str, Any]]:
    """Per foreground class of ``labels``, then per region (a union of label values, e.g. BraTS whole tumour =
    1+2+4): metrics keyed by class or region name."""
    if pred.shape != ref.shape:
        raise InputError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    out = {name: class_metrics(pred == v, ref == v, spacing, tolerance_mm) for v, name in sorted(labels.items()) if v != 0}
    for name, values in (regions or {}).items():
        out[name] = {**class_metrics(np.isin(pred, values), np.isin(ref, values), spacing, tolerance_mm),
                     "region": sorted(int(v) for v in values)}
    return out


def unlisted_values(arr: np.ndarray, labels: dict[int, str]) -> list[int]:
    """Label values present in ``arr`` that ``labels`` does not name (they are not scored: say so)."""
    return sorted(int(v) for v in np.unique(arr) if int(v) not in labels)


def evaluate_files(pairs: list[tuple[str, str, str]], labels: dict[int, str],
                   regions: dict[str, list[int]] | None = None) -> list[dict[str, Any]]:
    """``pairs`` of (case id, prediction file, reference file); the two must share grid and affine. Each row lists
    the label values found in either file that ``labels`` does not name (``unlisted``): they are not scored."""
    rows = []
    for cid, pred_path, ref_path in pairs:
        pred, pa = load_volume(pred_path, f"case {cid} prediction")
        ref, ra = load_volume(ref_path, f"case {cid} reference")
        if pred.shape != ref.shape:
            raise InputError(f"case {cid}: prediction shape {pred.shape} differs from reference shape {ref.shape}")
        if not np.allclose(pa, ra, atol=1e-3):
            raise InputError(f"case {cid}: prediction and reference have different geometry (affine)")
        spacing = tuple(float(s) for s in np.linalg.norm(ra[:3, :3], axis=0))
        p, r = np.rint(pred).astype(int), np.rint(ref).astype(int)
        per_class = case_metrics(p, r, labels, spacing, regions=regions)  # type: ignore[arg-type]
        rows.append({"case": cid, "spacing": list(spacing), "classes": per_class,
                     "unlisted": {"prediction": unlisted_values(p, labels), "reference": unlisted_values(r, labels)}})
    return rows


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation per class and metric over cases; undefined distances are counted, not averaged."""
    summary: dict[str, dict[str, Any]] = {}
    names = list(rows[0]["classes"]) if rows else []
    for name in names:
        s: dict[str, Any] = {}
        for m in ("dice", "hd95", "assd", "surface_dice"):
            vals = [r["classes"][name].get(m) for r in rows if r["classes"][name].get(m) is not None]
            s[m] = {"mean": float(np.mean(vals)) if vals else None, "std": float(np.std(vals)) if vals else None, "n": len(vals)}
        s["undefined_distance"] = sum(1 for r in rows if r["classes"][name]["hd95"] is None)
        summary[name] = s
    return summary


REPORT_FILES = ("metrics.json", "metrics.csv")


def write_reports(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    """metrics.json (cases + summary) and metrics.csv (one row per case and class), each written atomically (the
    caller checks the folder first: :func:`outputs.check_report_folder` with ``REPORT_FILES``)."""
    from .outputs import atomic_write_text

    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(rows)
    atomic_write_text(out_dir / "metrics.json", json.dumps({"cases": rows, "summary": summary}, indent=2))
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    w.writerow(["case", "class", "dice", "hd95_mm", "assd_mm", "surface_dice", "tolerance_mm", "volume_pred_ml",
                "volume_ref_ml", "volume_diff_ml", "empty"])
    for r in rows:
        for name, m in r["classes"].items():
            w.writerow([r["case"], name, m["dice"], _num(m["hd95"]), _num(m["assd"]), m["surface_dice"], m["tolerance_mm"],
                        m["volume_pred_ml"], m["volume_ref_ml"], m["volume_diff_ml"], m["empty"] or ""])
    atomic_write_text(out_dir / "metrics.csv", buf.getvalue().encode("utf-8"))  # bytes: the rows end in \r\n as csv writes them
    return summary


def _num(v: float | None) -> float:
    return math.nan if v is None else v


def format_summary(summary: dict[str, dict[str, Any]]) -> str:
    lines = [f"{'class':28s} {'Dice':>14s} {'HD95 (mm)':>14s} {'ASSD (mm)':>14s}  undefined"]
    fmt = lambda s: "n/a" if s["mean"] is None else f"{s['mean']:.3f} ± {s['std']:.3f}"  # noqa: E731
    for name, s in summary.items():
        lines.append(f"{name:28s} {fmt(s['dice']):>14s} {fmt(s['hd95']):>14s} {fmt(s['assd']):>14s}  {s['undefined_distance']}")
    return "\n".join(lines)
