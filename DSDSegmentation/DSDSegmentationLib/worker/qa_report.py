"""``dsdseg qa PRED REF``: a boundary QA report folder without Slicer.

``index.html`` with the metrics table per structure (Dice, HD95, ASSD, surface Dice, volume difference) and the
worst boundary errors; ``errors/*.png``: the slice through each worst error with both outlines (prediction yellow,
reference cyan) over the image; ``surfaces/*.png``: each predicted surface coloured by signed distance to the
reference surface (blue inside, red outside, legend in mm), rendered offscreen with VTK (EGL); ``qa.json``.
The metrics and error search are the engine's (``engine/metrics.py``, ``engine/qa.py``), shared with the panel.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.errors import InputError
from ..engine.io import load_volume
from ..engine.metrics import case_metrics, union_box
from ..engine.pictures import offscreen_pyplot
from ..engine.qa import boundary_errors, worst_first

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def _outline_png(plt: Any, image: np.ndarray | None, pred: np.ndarray, ref: np.ndarray, ijk: list[int], spacing,
                 path: Path, title: str) -> Path:
    k = int(ijk[2])
    fig, ax = plt.subplots(figsize=(5, 5), dpi=110)
    if image is not None:
        ax.imshow(image[:, :, k].T, cmap="gray", origin="lower", aspect=spacing[1] / spacing[0])
    else:
        ax.imshow(np.zeros(pred.shape[:2]).T, cmap="gray", origin="lower", aspect=spacing[1] / spacing[0])
    for mask, color in ((ref, "cyan"), (pred, "yellow")):
        sl = mask[:, :, k].T.astype(float)
        if sl.any():
            ax.contour(sl, levels=[0.5], colors=color, linewidths=1.6)
    ax.plot([ijk[0]], [ijk[1]], marker="o", markersize=14, markerfacecolor="none", markeredgecolor="red", markeredgewidth=2)
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _surface(mask: np.ndarray, spacing) -> Any:
    import vtk
    from vtkmodules.util.numpy_support import numpy_to_vtk

    img = vtk.vtkImageData()
    padded = np.pad(mask.astype(np.uint8), 1)
    img.SetDimensions(*padded.shape)
    img.SetSpacing(*spacing)
    img.SetOrigin(*[-s for s in spacing])
    img.GetPointData().SetScalars(numpy_to_vtk(padded.ravel(order="F"), deep=True))
    mc = vtk.vtkDiscreteFlyingEdges3D()
    mc.SetInputData(img)
    mc.SetValue(0, 1)
    smooth = vtk.vtkWindowedSincPolyDataFilter()
    smooth.SetInputConnection(mc.GetOutputPort())
    smooth.SetNumberOfIterations(15)
    smooth.SetPassBand(0.1)
    smooth.NormalizeCoordinatesOn()
    smooth.Update()
    return with_normals(smooth.GetOutput())


def with_normals(poly: Any) -> Any:
    """Consistent outward point normals (also after a mapping that mirrors, e.g. into a left-handed volume's RAS)."""
    import vtk

    normals = vtk.vtkPolyDataNormals()
    normals.SetInputData(poly)
    normals.ConsistencyOn()
    normals.AutoOrientNormalsOn()
    normals.SplittingOff()
    normals.Update()
    return normals.GetOutput()


def signed_distance_surface(pred: np.ndarray, ref: np.ndarray, spacing) -> Any:
    """The predicted surface with point scalars ``Distance``: signed mm to the reference surface (> 0 outside)."""
    import vtk

    dist = vtk.vtkDistancePolyDataFilter()
    dist.SetInputData(0, _surface(pred, spacing))
    dist.SetInputData(1, _surface(ref, spacing))
    dist.SignedDistanceOn()
    dist.ComputeSecondDistanceOff()
    dist.Update()
    out = vtk.vtkPolyData()
    out.DeepCopy(dist.GetOutput())
    return out


def _surface_png(pred: np.ndarray, ref: np.ndarray, spacing, path: Path, title: str, clamp_mm: float = 5.0) -> Path:
    import vtk

    poly = signed_distance_surface(pred, ref, spacing)
    lut = vtk.vtkColorTransferFunction()
    lut.AddRGBPoint(-clamp_mm, 0.13, 0.35, 0.85)
    lut.AddRGBPoint(0.0, 0.97, 0.97, 0.97)
    lut.AddRGBPoint(clamp_mm, 0.85, 0.15, 0.12)
    mapper = vtk.vtkPolyDataMapper()
    mapper.SetInputData(poly)
    mapper.SetLookupTable(lut)
    mapper.SetScalarModeToUsePointFieldData()
    mapper.SelectColorArray("Distance")
    mapper.SetScalarRange(-clamp_mm, clamp_mm)
    mapper.ScalarVisibilityOn()
    actor = vtk.vtkActor()
    actor.SetMapper(mapper)
    ref_actor = vtk.vtkActor()
    ref_mapper = vtk.vtkPolyDataMapper()
    ref_mapper.SetInputData(_surface(ref, spacing))
    ref_mapper.ScalarVisibilityOff()
    ref_actor.SetMapper(ref_mapper)
    ref_actor.GetProperty().SetRepresentationToWireframe()
    ref_actor.GetProperty().SetColor(0.1, 0.8, 0.8)
    ref_actor.GetProperty().SetOpacity(0.15)
    bar = vtk.vtkScalarBarActor()
    bar.SetLookupTable(lut)
    bar.SetTitle("mm")
    bar.SetNumberOfLabels(5)
    bar.SetWidth(0.1)
    text = vtk.vtkTextActor()
    text.SetInput(title)
    text.GetTextProperty().SetFontSize(16)
    text.SetPosition(10, 10)
    renderer = vtk.vtkRenderer()
    renderer.SetBackground(0.12, 0.12, 0.16)
    for a in (actor, ref_actor, bar, text):
        renderer.AddViewProp(a)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(640, 520)
    window.AddRenderer(renderer)
    renderer.ResetCamera()
    renderer.GetActiveCamera().Azimuth(35)
    renderer.GetActiveCamera().Elevation(25)
    renderer.ResetCameraClippingRange()
    window.Render()
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    window.Finalize()
    return path


def write_qa_report(pred_file: str | Path, ref_file: str | Path, labels: dict[int, str], output: str | Path,
                    image_file: str | Path | None = None, tolerance_mm: float = 1.0, worst: int = 5,
                    regions: dict[str, list[int]] | None = None, overwrite: bool = False) -> dict[str, Any]:
    """Write the report folder (one that already holds files of a report's names only with ``overwrite``);
    returns what ``qa.json`` holds (``notes`` says what the numbers cannot: an empty reference, label values the
    labels do not name)."""
    from ..engine.metrics import unlisted_values
    from ..engine.outputs import atomic_write_text, check_report_folder

    out = Path(output)
    files = ["qa.json", "index.html", *(f"errors/error_{i + 1}.png" for i in range(worst)),
             *(f"surfaces/{_slug(name)}.png" for value, name in sorted(labels.items()) if value)]
    check_report_folder(out, files, inputs=(pred_file, ref_file, image_file), overwrite=overwrite)
    pred, pa = load_volume(pred_file, "prediction")
    ref, ra = load_volume(ref_file, "reference")
    if pred.shape != ref.shape or not np.allclose(pa, ra, atol=1e-3):
        raise InputError(f"{pred_file} and {ref_file} must share grid and geometry (shape {pred.shape} vs {ref.shape})")
    image = None
    if image_file:
        image, ia = load_volume(image_file, "image")
        image = image if image.ndim == 3 else image[..., 0]
        if image.shape != pred.shape:
            raise InputError(f"the image {image_file} has shape {image.shape}, the segmentations {pred.shape}")
    spacing = tuple(float(s) for s in np.linalg.norm(ra[:3, :3], axis=0))
    pred, ref = np.rint(pred).astype(int), np.rint(ref).astype(int)
    metrics = case_metrics(pred, ref, labels, spacing, tolerance_mm, regions=regions)  # type: ignore[arg-type]
    notes = []
    if not np.any(np.isin(ref, [v for v in labels if v])):
        notes.append("the reference holds no labelled structure: every predicted voxel counts as an extra, distances "
                     "are undefined")
    for side, arr in (("prediction", pred), ("reference", ref)):
        extra = unlisted_values(arr, labels)
        if extra:
            notes.append(f"label value(s) {extra} in the {side} are not among the labels {sorted(labels)} and are not scored")
    errors, surfaces = [], {}
    for value, name in sorted(labels.items()):
        if value == 0:
            continue
        p, r = pred == value, ref == value
        for e in boundary_errors(p, r, spacing, count=worst):
            errors.append({**e, "structure": name})
        if p.any() and r.any():
            box = union_box(p, r)  # the same surfaces within the box of both (+2 voxels), at a fraction of the work
            surfaces[name] = str(_surface_png(p[box], r[box], spacing, out / "surfaces" / f"{_slug(name)}.png",
                                              f"{name}: signed distance to the reference"))
    errors = worst_first(errors, worst)
    value_of = {n: v for v, n in labels.items()}
    plt = offscreen_pyplot() if errors else None
    if errors and plt is None:
        notes.append("the outline pictures of the worst errors need matplotlib, which this Python lacks (pip install "
                     "matplotlib); the errors' positions and distances are listed without them")
    for i, e in enumerate(errors):
        v = value_of[e["structure"]]
        e["png"] = None if plt is None else str(_outline_png(
            plt, image, pred == v, ref == v, e["ijk"], spacing, out / "errors" / f"error_{i + 1}.png",
            f"#{i + 1} {e['structure']}: {_describe(e)} (slice {e['ijk'][2]})"))
    report = {"prediction": str(pred_file), "reference": str(ref_file), "image": str(image_file) if image_file else None,
              "spacing_mm": list(spacing), "tolerance_mm": tolerance_mm, "metrics": metrics, "worst_errors": errors,
              "surfaces": surfaces, "notes": notes}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "qa.json", json.dumps(report, indent=2))
    atomic_write_text(out / "index.html", _html(report, out))
    return report


def _describe(error: dict[str, Any]) -> str:
    """One worst error in words: its distance and kind, or a structure missed altogether."""
    if error["distance_mm"] is None:
        return "whole structure missed"
    return f"{error['distance_mm']:.1f} mm {error['kind']}"


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower())


def _html(report: dict[str, Any], out: Path) -> str:
    f = lambda v, d=3: "n/a" if v is None else f"{v:.{d}f}"  # noqa: E731
    rows = "".join(
        f"<tr><td>{html.escape(n)}</td><td>{f(m['dice'])}</td><td>{f(m['hd95'], 2)}</td><td>{f(m['assd'], 2)}</td>"
        f"<td>{f(m['surface_dice'])}</td><td>{f(m['volume_pred_ml'], 2)}</td><td>{f(m['volume_ref_ml'], 2)}</td>"
        f"<td>{f(m['volume_diff_ml'], 2)}</td><td>{f(m['volume_diff_pct'], 1)}</td></tr>"
        for n, m in report["metrics"].items())
    def figure(i: int, e: dict[str, Any]) -> str:
        img = "" if e.get("png") is None else f"<img src='{Path(e['png']).relative_to(out)}' width='360'>"
        return (f"<figure>{img}<figcaption>#{i + 1} {html.escape(e['structure'])}: {_describe(e)} at voxel "
                f"{e['ijk']}</figcaption></figure>")

    errs = "".join(figure(i, e) for i, e in enumerate(report["worst_errors"]))
    surfs = "".join(f"<figure><img src='{Path(p).relative_to(out)}' width='420'><figcaption>{html.escape(n)}</figcaption></figure>"
                    for n, p in report["surfaces"].items())
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>DSDSegmentation boundary QA</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #bbb;padding:4px 8px;text-align:right}}
td:first-child{{text-align:left}} figure{{display:inline-block;margin:8px}}</style></head><body>
<h1>Boundary QA</h1>
<p>Prediction <code>{html.escape(report['prediction'])}</code> against reference <code>{html.escape(report['reference'])}</code>;
voxel spacing {', '.join(f'{s:.3g}' for s in report['spacing_mm'])} mm; surface Dice tolerance {report['tolerance_mm']} mm.</p>
<table><tr><th>structure</th><th>Dice</th><th>HD95 (mm)</th><th>ASSD (mm)</th><th>surface Dice</th><th>volume (ml)</th>
<th>reference (ml)</th><th>difference (ml)</th><th>difference (%)</th></tr>{rows}</table>
{''.join(f"<p><strong>Note:</strong> {html.escape(n)}</p>" for n in report.get("notes", []))}
<h2>Worst boundary errors</h2><p>Yellow: prediction, cyan: reference, red circle: the error. <em>extra</em>: predicted
boundary outside the reference; <em>missed</em>: reference boundary the prediction does not reach.</p>{errs or '<p>none above one voxel</p>'}
<h2>Surfaces coloured by signed distance to the reference</h2><p>Blue: inside the reference (too small), white: on it,
red: outside it (too big); saturated at ±5 mm. Cyan wireframe: the reference surface.</p>{surfs}
</body></html>
"""
