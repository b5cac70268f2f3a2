"""Visual QA of segmentation boundaries on the MRML scene (Qt-free, runs in Slicer and headless).

``compare`` puts, for a segmentation and a reference on one volume: a table node of metrics per segment (Dice,
HD95, ASSD, surface Dice at a tolerance, volume difference), both segmentations as outlines in contrasting colours,
one model per segment coloured by signed distance to the reference boundary (diverging map, range in mm), and a
markups node at the worst boundary errors, worst first. ``uncertainty_overlay`` shows a voxel uncertainty map and
scores each segment by it, for when there is no reference.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import slicer
import vtk

from ..engine.errors import InputError
from ..worker.process import WorkerProcess
from .logic import follow_transform, segment_array, segment_has_voxels
from .sequences import pin_frame
from ..worker.qa_panel import PANEL_RESULT, write_panel_request

PRED_OUTLINE = (1.0, 0.85, 0.1)  # yellow
REF_OUTLINE = (0.1, 0.9, 0.9)  # cyan
METRIC_COLUMNS = ("Segment", "Dice", "HD95 (mm)", "ASSD (mm)", "Surface Dice", "Volume (ml)", "Reference volume (ml)",
                  "Volume difference (ml)", "Volume difference (%)")


@dataclass
class QAResult:
    table: Any
    models: dict[str, Any]
    markups: Any
    metrics: dict[str, dict[str, Any]]
    errors: list[dict[str, Any]] = field(default_factory=list)
    color_node: Any = None
    display_before: dict[str, dict[str, Any]] = field(default_factory=dict)  # per node ID: see ``show_outlines``


@dataclass
class QARun:
    """A Compare running in the worker: poll ``worker`` (``running``, ``poll``), then :meth:`QALogic.finish_compare`."""

    worker: Any
    folder: Path
    segmentation: Any
    reference: Any
    volume: Any
    pairs: list[tuple[str, str, str]]
    clamp_mm: float
    pinned: Any = None  # a cine's browser shows one of the three nodes: the frame compared (sequences.PinnedFrame)

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _spacing_kji(volume: Any) -> tuple[float, float, float]:
    s = volume.GetSpacing()
    return (s[2], s[1], s[0])


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


class QALogic:
    """Boundary QA nodes for one scene. The numbers and distance surfaces are computed in the worker (the
    ``bridge``'s warm one, or a one-shot ``dsdseg qa-panel``): Slicer's main thread only exports the masks and
    builds the nodes."""

    def __init__(self, scene: Any, bridge: Any = None):
        self.scene = scene
        self.bridge = bridge  # a SegmentationBridge: its warm worker, Python and temporary folder

    # ------------------------------------------------------------------------------------------------ compare
    def common_segments(self, segmentation: Any, reference: Any) -> list[tuple[str, str, str]]:
        """(name, segment id in the segmentation, segment id in the reference) for segments named alike."""
        seg, ref = segmentation.GetSegmentation(), reference.GetSegmentation()
        pairs = []
        for i in range(seg.GetNumberOfSegments()):
            name = seg.GetNthSegment(i).GetName()
            rid = ref.GetSegmentIdBySegmentName(name)
            if rid:
                pairs.append((name, seg.GetNthSegmentID(i), rid))
        if not pairs:
            raise InputError(f"'{segmentation.GetName()}' and '{reference.GetName()}' have no segment names in common; "
                             "QA compares segments of the same name")
        return pairs

    def compare(self, segmentation: Any, reference: Any, volume: Any, tolerance_mm: float = 1.0, worst: int = 5,
                clamp_mm: float = 5.0) -> QAResult:
        """Blocking: metrics table, outlines, distance-coloured surfaces and worst-error markups (see the module
        doc). The panel uses :meth:`start_compare` / :meth:`finish_compare` instead, so that Slicer stays usable."""
        run = self.start_compare(segmentation, reference, volume, tolerance_mm, worst, clamp_mm)
        try:
            while run.worker.running:
                run.worker.poll()
                time.sleep(0.02)
        except BaseException:
            self.cancel_compare(run)
            raise
        return self.finish_compare(run)

    def start_compare(self, segmentation: Any, reference: Any, volume: Any, tolerance_mm: float = 1.0, worst: int = 5,
                      clamp_mm: float = 5.0) -> QARun:
        """Write both segmentations' masks of the segments named alike (on the volume's grid, cropped to the box of
        each pair) and start the worker on them; nothing in the scene changes until :meth:`finish_compare`."""
        if volume is None or volume.GetImageData() is None:
            raise InputError("QA needs the volume both segmentations lie on (its grid is where metrics are computed)")
        pinned = pin_frame(self.scene, volume, segmentation, reference)
        pairs = self.common_segments(segmentation, reference)
        masks = [(name, segment_array(segmentation, sid, volume) > 0,
                  segment_array(reference, rid, volume) > 0) for name, sid, rid in pairs]
        for (name, sid, rid), (_, p, r) in zip(pairs, masks):  # a wrong volume would read as 'both empty, Dice 1'
            for node, segment_id, mask in ((segmentation, sid, p), (reference, rid, r)):
                if not mask.any() and segment_has_voxels(node.GetSegmentation().GetSegment(segment_id)):
                    raise InputError(f"segment '{name}' of '{node.GetName()}' lies outside the volume "
                                     f"'{volume.GetName()}': pick the volume the segmentations belong to")
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(ijk_to_ras)
        kji_to_ras = slicer.util.arrayFromVTKMatrix(ijk_to_ras) @ np.array(
            [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)  # arrays from Slicer are (k, j, i)
        bridge = self.bridge
        root = Path(bridge.temp_root) if bridge is not None and bridge.temp_root else Path(tempfile.gettempdir())
        try:
            folder = Path(tempfile.mkdtemp(prefix="dsdseg-qa-", dir=root))
        except OSError as e:
            raise InputError(f"cannot create a temporary folder in {root}: {e.strerror or e}") from e
        try:
            write_panel_request(folder, masks, _spacing_kji(volume), kji_to_ras, tolerance_mm, worst)
            if bridge is not None and bridge.server is not None:
                worker = bridge.server.submit({"command": "qa", "folder": str(folder)})
            else:
                worker = WorkerProcess(["qa-panel", str(folder)], python=getattr(bridge, "python", None),
                                       env=getattr(bridge, "env", None))
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return QARun(worker, folder, segmentation, reference, volume, pairs, clamp_mm, pinned)

    def cancel_compare(self, run: QARun) -> None:
        """Stop the worker's comparison (a warm worker goes on) and remove its files; the scene is unchanged."""
        run.worker.cancel()
        run.worker.wait()
        run.cleanup()

    def finish_compare(self, run: QARun) -> QAResult:
        """The worker has ended: the table, outlines, surfaces and points from its results (fast)."""
        try:
            result = run.worker.wait()
            result.raise_for_status("QA")
            out = json.loads((run.folder / PANEL_RESULT).read_text(encoding="utf-8"))
            segmentation, reference = run.segmentation, run.reference
            for node in (segmentation, reference, run.volume):
                if not self.scene.IsNodePresent(node):
                    raise InputError(f"'{node.GetName()}' was removed from the scene while comparing; nothing was shown")
            if run.pinned is not None:
                run.pinned.check(run.volume, "comparing", more="")
            metrics = out["metrics"]
            table = self._metrics_table(f"QA {segmentation.GetName()} vs {reference.GetName()}", metrics)
            display_before = self.show_outlines(segmentation, reference)
            color = self.distance_color_node(run.clamp_mm)
            models = {}
            for name, _sid, _rid in run.pairs:
                if name in out["surfaces"]:
                    models[name] = self._distance_model_from_file(run.folder / out["surfaces"][name],
                                                                  f"QA {name} distance", color, run.clamp_mm)
            markups = self._error_markups(f"QA worst errors {segmentation.GetName()}", out["errors"])
            for node in (*models.values(), markups):  # computed on the volume's grid, in its own RAS
                follow_transform(node, run.volume)
            return QAResult(table, models, markups, metrics, out["errors"], color, display_before)
        finally:
            run.cleanup()

    def _metrics_table(self, name: str, metrics: dict[str, dict[str, Any]]) -> Any:
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for column in METRIC_COLUMNS:
            array = vtk.vtkStringArray() if column == "Segment" else vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        t = table.GetTable()
        for seg_name, m in metrics.items():
            row = table.AddEmptyRow()
            values = (m["dice"], m["hd95"], m["assd"], m["surface_dice"], m["volume_pred_ml"], m["volume_ref_ml"],
                      m["volume_diff_ml"], m["volume_diff_pct"])
            t.GetColumn(0).SetValue(row, seg_name)
            for c, v in enumerate(values, start=1):
                t.GetColumn(c).SetValue(row, np.nan if v is None else float(v))
        table.SetColumnDescription("Surface Dice", f"share of both boundaries within {next(iter(metrics.values()))['tolerance_mm']} mm of the other")
        t.Modified()
        return table

    def show_outlines(self, segmentation: Any, reference: Any) -> dict[str, dict[str, Any]]:
        """Both as outlines only, the segmentation yellow and the reference cyan (override colours: the segments'
        own colours are not changed). Returns how each node was shown before, for :meth:`restore_display`."""
        before: dict[str, dict[str, Any]] = {}
        for node, rgb in ((segmentation, PRED_OUTLINE), (reference, REF_OUTLINE)):
            if node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()
            d = node.GetDisplayNode()
            seg = node.GetSegmentation()
            overrides = {}
            for i in range(seg.GetNumberOfSegments()):
                sid = seg.GetNthSegmentID(i)
                color = d.GetSegmentOverrideColor(sid)
                overrides[sid] = None if min(color[0], color[1], color[2]) < 0 else (color[0], color[1], color[2])
            before[node.GetID()] = {"visibility": bool(d.GetVisibility()), "fill": bool(d.GetVisibility2DFill()),
                                    "outline": bool(d.GetVisibility2DOutline()),
                                    "thickness": int(d.GetSliceIntersectionThickness()), "overrides": overrides}
            d.SetVisibility(True)
            d.SetVisibility2DFill(False)
            d.SetVisibility2DOutline(True)
            d.SetSliceIntersectionThickness(2)
            for i in range(seg.GetNumberOfSegments()):
                d.SetSegmentOverrideColor(seg.GetNthSegmentID(i), *rgb)
        return before

    def restore_display(self, before: dict[str, dict[str, Any]]) -> None:
        """Show the compared segmentations as they were before :meth:`show_outlines` (nodes deleted since are
        skipped; segments added since keep their own colours)."""
        for node_id, state in before.items():
            node = self.scene.GetNodeByID(node_id)
            d = node.GetDisplayNode() if node is not None else None
            if d is None:
                continue
            d.SetVisibility(state["visibility"])
            d.SetVisibility2DFill(state["fill"])
            d.SetVisibility2DOutline(state["outline"])
            d.SetSliceIntersectionThickness(state["thickness"])
            seg = node.GetSegmentation()
            for i in range(seg.GetNumberOfSegments()):
                sid = seg.GetNthSegmentID(i)
                color = state["overrides"].get(sid)
                if color is None:
                    d.UnsetSegmentOverrideColor(sid)
                else:
                    d.SetSegmentOverrideColor(sid, *color)

    def distance_color_node(self, clamp_mm: float) -> Any:
        """Diverging colours for signed distance: blue = inside the reference (missed), white = on it,
        red = outside it (extra), saturated at ±``clamp_mm``."""
        node = self.scene.AddNewNodeByClass("vtkMRMLProceduralColorNode", "QA signed distance (mm)")
        ctf = vtk.vtkColorTransferFunction()
        ctf.AddRGBPoint(-clamp_mm, 0.13, 0.35, 0.85)
        ctf.AddRGBPoint(0.0, 0.97, 0.97, 0.97)
        ctf.AddRGBPoint(clamp_mm, 0.85, 0.15, 0.12)
        node.SetAndObserveColorTransferFunction(ctf)
        return node

    def _distance_model_from_file(self, path: Path, name: str, color_node: Any, clamp_mm: float) -> Any:
        """A model node of the worker's surface (RAS, point scalars ``Distance`` = signed mm to the reference
        surface: > 0 outside the reference, < 0 inside), coloured with ``color_node`` in ±``clamp_mm``."""
        reader = vtk.vtkXMLPolyDataReader()
        reader.SetFileName(str(path))
        reader.Update()
        out = vtk.vtkPolyData()
        out.DeepCopy(reader.GetOutput())
        if out.GetPointData().GetArray("Distance") is None:
            raise InputError(f"the worker's surface {path.name} has no distances")
        out.GetPointData().SetActiveScalars("Distance")
        model = self.scene.AddNewNodeByClass("vtkMRMLModelNode", name)
        model.SetAndObservePolyData(out)
        model.CreateDefaultDisplayNodes()
        d = model.GetDisplayNode()
        d.SetActiveScalarName("Distance")
        d.SetAndObserveColorNodeID(color_node.GetID())
        d.SetScalarRangeFlag(slicer.vtkMRMLDisplayNode.UseManualScalarRange)
        d.SetScalarRange(-clamp_mm, clamp_mm)
        d.SetScalarVisibility(True)
        d.SetVisibility2D(False)
        return model

    def _error_markups(self, name: str, errors: list[dict[str, Any]]) -> Any:
        markups = self.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        markups.CreateDefaultDisplayNodes()
        for i, e in enumerate(errors):
            d = "whole segment missed" if e["distance_mm"] is None else f"{e['distance_mm']:.1f} mm {e['kind']}"
            idx = markups.AddControlPoint(vtk.vtkVector3d(*e["ras"]), f"{i + 1}")
            markups.SetNthControlPointDescription(idx, f"{e['segment']}: {d}")
            markups.SetNthControlPointLocked(idx, True)
        return markups

    # ------------------------------------------------------------------------------------------------ uncertainty
    def uncertainty_overlay(self, uncertainty_file: str | Path, segmentation: Any, volume: Any,
                            labels: dict[int, str]) -> tuple[Any, Any]:
        """Load a voxel uncertainty map (0..1) as a volume with a heat colour map, and a table scoring each
        segment (mean uncertainty over the segment and a one-voxel band around it), highest first."""
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume.GetName()} uncertainty")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(uncertainty_file))
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            raise InputError(f"could not read the uncertainty map {uncertainty_file}")
        follow_transform(node, volume)  # on the input's grid, in its own RAS
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        heat = self.scene.GetFirstNodeByName("Inferno") or self.scene.GetFirstNodeByName("ColdToHotRainbow")
        if heat is not None:
            display.SetAndObserveColorNodeID(heat.GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        unc = slicer.util.arrayFromVolume(node)
        seg = segmentation.GetSegmentation()
        label_array = np.zeros(unc.shape, np.uint8)
        for value, name in labels.items():
            sid = seg.GetSegmentIdBySegmentName(name)
            if value and sid:
                label_array[segment_array(segmentation, sid, volume) > 0] = value
        from ..engine.qa import uncertainty_scores

        scores = uncertainty_scores(unc, label_array, labels)
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{volume.GetName()} uncertainty per segment")
        for column, cls in (("Segment", vtk.vtkStringArray), ("Mean uncertainty", vtk.vtkDoubleArray)):
            a = cls()
            a.SetName(column)
            table.AddColumn(a)
        for name, score in sorted(scores.items(), key=lambda kv: -(kv[1] if kv[1] is not None else -1)):
            row = table.AddEmptyRow()
            table.GetTable().GetColumn(0).SetValue(row, name)
            table.GetTable().GetColumn(1).SetValue(row, np.nan if score is None else score)
        return node, table
