"""Volumes that are frames of a sequence (a cine MRI series, any 4D series loaded into the Sequences module).

In Slicer such a series is a sequence node (one volume per frame, in its own internal scene) shown through a
*proxy* volume that a sequence browser fills with the selected frame. The panel's input is that proxy: a run on
"the volume" segments the frame shown when it started, and a run over "all frames" segments each item of the
sequence and gives back a segmentation sequence that the same browser shows frame by frame. MRML only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import slicer
import vtk

from ..engine.cine import ejection_fractions as engine_ejection_fractions
from ..engine.errors import InputError


@dataclass
class Cine:
    """The sequence a proxy volume shows, its browser, and the frame shown now."""

    browser: Any
    sequence: Any

    @property
    def count(self) -> int:
        return int(self.sequence.GetNumberOfDataNodes())

    def shown(self) -> str:
        """The index value of the browser's selected item (the frame its proxies show now)."""
        master = self.browser.GetMasterSequenceNode()
        number = self.browser.GetSelectedItemNumber()
        return master.GetNthIndexValue(number) if master is not None and number >= 0 else ""

    def label(self, value: str) -> str:
        """'frame 3 (time 80 ms)' for an index value, as the user reads it."""
        number = self.sequence.GetItemNumberFromIndexValue(value)
        name = self.sequence.GetIndexName() or "index"
        unit = f" {self.sequence.GetIndexUnit()}" if self.sequence.GetIndexUnit() else ""
        return f"frame {number + 1} ({name} {value}{unit})"

    def frames(self) -> list[tuple[str, Any]]:
        """(index value, frame volume) of every item, in order."""
        return [(self.sequence.GetNthIndexValue(i), self.sequence.GetNthDataNode(i)) for i in range(self.count)]


def cine_of(scene: Any, volume: Any) -> Cine | None:
    """The sequence whose frames ``volume`` shows (it is a sequence browser's proxy), or None for a plain volume."""
    if volume is None:
        return None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSequenceBrowserNode")):
        browser = scene.GetNthNodeByClass(i, "vtkMRMLSequenceBrowserNode")
        sequence = browser.GetSequenceNode(volume) if browser is not None else None
        if sequence is not None:
            return Cine(browser, sequence)
    return None


@dataclass
class PinnedFrame:
    """The frame a cine showed when a one-frame run (Apply, a click, a Compare) started."""

    cine: Cine
    value: str

    def check(self, volume: Any, doing: str = "segmenting", more: str = ", or check 'All frames'") -> None:
        """Before the run's result is added: the browser still shows that frame. A result for a frame no longer shown
        (the user scrolled on) would land on another frame's image and, in a segmentation synchronised with the
        browser, in that frame's item: nothing is added."""
        now = self.cine.shown()
        if now != self.value:
            raise InputError(f"'{volume.GetName()}' went from {self.cine.label(self.value)} to {self.cine.label(now)} "
                             f"while {doing} (the sequence browser moved); nothing was added: stop playback on the "
                             f"frame you want and try again{more}")


def pin_frame(scene: Any, *nodes: Any) -> PinnedFrame | None:
    """The frame shown now by the cine one of ``nodes`` shows (None if none does); refused while its browser plays:
    the frame changes several times a second and a one-frame result would belong to a frame long gone by the time it
    is ready."""
    for node in nodes:
        cine = cine_of(scene, node)
        if cine is not None:
            if cine.browser.GetPlaybackActive():
                raise InputError(f"'{node.GetName()}' is playing (sequence browser '{cine.browser.GetName()}'): stop "
                                 "playback on the frame you want first, or check 'All frames' to segment every frame")
            return PinnedFrame(cine, cine.shown())
    return None


def segment_volumes_ml(segmentation_node: Any) -> dict[str, float]:
    """Segment name → volume in mL, counted on each segment's binary labelmap (voxel count × voxel volume)."""
    from .logic import _own_mask

    segmentation = segmentation_node.GetSegmentation()
    name = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
    volumes = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        image = segment.GetRepresentation(name)
        mask = _own_mask(segment, image) if image is not None else None
        matrix = vtk.vtkMatrix4x4()
        if image is not None:
            image.GetImageToWorldMatrix(matrix)
        voxel_mm3 = abs(np.linalg.det(slicer.util.arrayFromVTKMatrix(matrix)[:3, :3])) if image is not None else 0.0
        volumes[segment.GetName()] = float(mask.sum()) * voxel_mm3 / 1000.0 if mask is not None else 0.0
    return volumes


def volume_table(scene: Any, name: str, cine: Cine, values: list[str], volumes: list[dict[str, float]],
                 labels: list[str]) -> Any:
    """A table node: one row per frame (number, index value), one column per label with its volume in mL."""
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    index = cine.sequence.GetIndexName() or "index"
    unit = f" ({cine.sequence.GetIndexUnit()})" if cine.sequence.GetIndexUnit() else ""
    columns = [vtk.vtkIntArray(), vtk.vtkStringArray()] + [vtk.vtkDoubleArray() for _ in labels]
    for column, title in zip(columns, ["Frame", f"{index}{unit}"] + [f"{label} (mL)" for label in labels]):
        column.SetName(title)
        table.GetTable().AddColumn(column)
    t = table.GetTable()
    t.SetNumberOfRows(len(values))
    for row, (value, per_label) in enumerate(zip(values, volumes)):
        t.SetValue(row, 0, vtk.vtkVariant(row + 1))
        t.SetValue(row, 1, vtk.vtkVariant(value))
        for c, label in enumerate(labels):
            t.SetValue(row, 2 + c, vtk.vtkVariant(round(per_label.get(label, 0.0), 2)))
    t.Modified()
    return table


def volume_chart(scene: Any, table: Any, labels: list[str], colors: dict[str, tuple[int, int, int]]) -> Any:
    """A plot chart of the volumes table: one line per label (its segment colour) over the frames."""
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", table.GetName())
    chart.SetTitle(table.GetName())
    chart.SetXAxisTitle("frame")
    chart.SetYAxisTitle("volume (mL)")
    for label in labels:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{table.GetName()}: {label}")
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName("Frame")
        series.SetYColumnName(f"{label} (mL)")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        if label in colors:
            series.SetColor(*(c / 255.0 for c in colors[label]))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    return chart


def ejection_fractions(cine: Cine, values: list[str], volumes: list[dict[str, float]],
                       card: dict[str, Any]) -> list[str]:
    """The ventricles' ejection fractions over the frames (``engine/cine.py``), each frame named as Slicer shows it,
    with the model's agreement with the manual reference where its card has it."""
    return engine_ejection_fractions([cine.label(v) for v in values], volumes, card["preset"],
                                     card.get("validation", {}).get("clinical_indices"))
