"""The Slicer panel's Compare, computed in the worker (``dsdseg serve`` request ``qa``, or ``dsdseg qa-panel``).

The panel writes each pair of segments of one name as boolean masks, cropped to the box of both, into a folder
(:func:`write_panel_request`, run in Slicer's process: numpy only, nothing that loads torch or changes VTK's
settings); the worker computes what Slicer's main thread would otherwise compute for seconds on a BraTS-size case
(:func:`run_panel_request`: the engine's metrics and worst boundary errors, and the distance-coloured surfaces of
``qa_report``, the CLI report's own) and writes ``result.json`` and one ``.vtp`` per surface, in RAS.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.errors import InputError

PANEL_REQUEST, PANEL_MASKS, PANEL_RESULT = "request.json", "masks.npz", "result.json"


def write_panel_request(folder: str | Path, pairs: list[tuple[str, np.ndarray, np.ndarray]], spacing_kji, kji_to_ras,
                        tolerance_mm: float = 1.0, worst: int = 5) -> Path:
    """``folder/request.json`` + ``masks.npz``: per pair (name, prediction, reference; boolean KJI arrays on one
    grid) the masks within the bounding box of both (+2 voxels) and its offset; ``kji_to_ras``: the 4x4 matrix that
    maps voxel indices (k, j, i) to RAS, for the surfaces. Both empty: stored as a 1-voxel box (metrics say so)."""
    from ..engine.metrics import union_box

    folder = Path(folder)
    arrays, entries = {}, []
    for n, (name, pred, ref) in enumerate(pairs):
        box = union_box(pred, ref)
        if any(b.stop <= b.start for b in box):
            box = tuple(slice(0, 1) for _ in box)
        arrays[f"pred_{n}"], arrays[f"ref_{n}"] = np.asarray(pred[box], bool), np.asarray(ref[box], bool)
        entries.append({"name": name, "offset": [int(b.start) for b in box]})
    np.savez(folder / PANEL_MASKS, **arrays)
    request = {"pairs": entries, "spacing": [float(s) for s in spacing_kji],
               "kji_to_ras": np.asarray(kji_to_ras, float).tolist(), "tolerance_mm": float(tolerance_mm), "worst": int(worst)}
    (folder / PANEL_REQUEST).write_text(json.dumps(request), encoding="utf-8")
    return folder / PANEL_REQUEST


def run_panel_request(folder: str | Path, should_stop=None, progress=None) -> dict[str, Any]:
    """Metrics (the engine's ``class_metrics``), the worst boundary errors (``boundary_errors``, voxel index and RAS)
    and per pair a surface of the prediction with point scalars ``Distance`` (signed mm to the reference surface,
    > 0 outside) written in RAS as ``surface_<n>.vtp``; all in ``result.json``. ``should_stop()`` is asked between
    pairs (raises Cancelled)."""
    import vtk

    from vtkmodules.util.numpy_support import numpy_to_vtk, vtk_to_numpy

    from ..engine.errors import Cancelled
    from ..engine.metrics import class_metrics
    from ..engine.qa import boundary_errors, worst_first
    from .qa_report import signed_distance_surface, with_normals

    folder = Path(folder)
    try:
        request = json.loads((folder / PANEL_REQUEST).read_text(encoding="utf-8"))
        masks = np.load(folder / PANEL_MASKS)
    except (OSError, ValueError) as e:
        raise InputError(f"QA request in {folder} is unreadable: {e}") from e
    spacing = tuple(float(s) for s in request["spacing"])
    to_ras = np.asarray(request["kji_to_ras"], float)
    worst = int(request.get("worst", 5))
    metrics, errors, surfaces = {}, [], {}
    pairs = request["pairs"]
    for n, entry in enumerate(pairs):
        if should_stop is not None and should_stop():
            raise Cancelled("QA was cancelled")
        if progress is not None:
            progress.update("qa", n, len(pairs), f"Comparing '{entry['name']}'…")
        p, r, offset = masks[f"pred_{n}"], masks[f"ref_{n}"], np.asarray(entry["offset"])
        name = entry["name"]
        metrics[name] = class_metrics(p, r, spacing, float(request.get("tolerance_mm", 1.0)))
        for e in boundary_errors(p, r, spacing, count=worst):
            kji = [int(v) for v in np.asarray(e["ijk"]) + offset]
            errors.append({**e, "ijk": kji, "segment": name, "ras": (to_ras @ np.array([*kji, 1.0]))[:3].tolist()})
        if p.any() and r.any():
            poly = signed_distance_surface(p, r, spacing)
            pts = vtk_to_numpy(poly.GetPoints().GetData()).astype(float)  # mm along the crop's K, J, I axes
            kji = pts / np.asarray(spacing) + offset
            ras = kji @ to_ras[:3, :3].T + to_ras[:3, 3]
            poly.GetPoints().SetData(numpy_to_vtk(np.ascontiguousarray(ras), deep=True))
            writer = vtk.vtkXMLPolyDataWriter()
            writer.SetFileName(str(folder / f"surface_{n}.vtp"))
            writer.SetInputData(with_normals(poly))  # the mapping may mirror: normals again
            writer.SetDataModeToBinary()
            if not writer.Write():
                raise InputError(f"could not write {folder / f'surface_{n}.vtp'}")
            surfaces[name] = f"surface_{n}.vtp"
    result = {"metrics": metrics, "errors": worst_first(errors, worst), "surfaces": surfaces}
    (folder / PANEL_RESULT).write_text(json.dumps(result), encoding="utf-8")
    return result
