"""MRML bridge (the module's Logic): volume nodes → files → ``dsdseg`` worker → labelmap → segment nodes.

Qt-free and MRML-only: storage nodes and module logics, never ``slicer.util`` load/save helpers or ``slicer.app``,
so the same code runs inside Slicer and headless on a real MRML scene from ``slicer-core``.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import contextmanager
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Generator, Sequence

import numpy as np
import slicer
import vtk
from vtk.util.numpy_support import vtk_to_numpy

from ..engine.cards import read_model_card, verify_package
from ..engine.errors import InputError
from ..engine.terminology import tag_string
from .sequences import cine_of, ejection_fractions, pin_frame, segment_volumes_ml, volume_chart, volume_table
from .terminology import get_segment_terminology, set_segment_terminology
from ..worker.process import ServeWorker, WorkerProcess, WorkerResult

def _entry_from_tag(tag: str) -> dict[str, str] | None:
    """A terminology entry (category, type, modifiers, region) from Slicer's tag string, or None without a type."""
    parts = tag.split("~")
    if len(parts) < 7:
        return None
    keys = {1: "category", 2: "type", 3: "type_modifier", 5: "region", 6: "region_modifier"}
    entry = {k: parts[i] for i, k in keys.items() if parts[i].strip("^")}
    return entry if "category" in entry and "type" in entry else None


# on each segment a model wrote: a fingerprint of its voxels then, so that a later run into the same segmentation can
# tell a segment the user has edited since (kept) from the model's own unchanged result (replaced)
RESULT_TAG = "DSDSegmentation.ResultFingerprint"
# on each segmentation node the module made: the ID of the input volume it was made for (saved with the scene)
MADE_FOR = "DSDSegmentation.InputVolumeID"


def segment_fingerprint(segment: Any) -> str | None:
    """A hash of the segment's voxels as world-anchored voxel indices of its binary labelmap (independent of the
    shared layer's extent, which changes when other segments change); None without a binary labelmap."""
    image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None:
        return None
    digest = hashlib.sha1()
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    digest.update(np.array([matrix.GetElement(i, j) for i in range(3) for j in range(4)]).round(6).tobytes())
    mask = _own_mask(segment, image)
    if mask is not None:
        ext = image.GetExtent()
        kji = np.argwhere(mask) + np.array([ext[4], ext[2], ext[0]])
        digest.update(kji.astype(np.int64).tobytes())
    return digest.hexdigest()


def _own_mask(segment: Any, image: Any = None) -> np.ndarray | None:
    """The segment's voxels on its own labelmap (KJI, the layer's extent); None without a labelmap or voxels array."""
    if image is None:
        image = segment.GetRepresentation(slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName())
    if image is None:
        return None
    ext = image.GetExtent()
    scalars = image.GetPointData().GetScalars()
    if scalars is None or ext[1] < ext[0] or ext[3] < ext[2] or ext[5] < ext[4]:
        return None
    dims = (ext[5] - ext[4] + 1, ext[3] - ext[2] + 1, ext[1] - ext[0] + 1)
    return vtk_to_numpy(scalars).reshape(dims) == segment.GetLabelValue()


def segment_has_voxels(segment: Any) -> bool:
    """Whether the segment holds any voxel in its own labelmap (whatever volume it is later looked at on)."""
    mask = _own_mask(segment)
    return bool(mask is not None and mask.any())


def is_unchanged_result(segment: Any) -> bool:
    """True for a segment a model wrote that nobody has edited since (its fingerprint still matches)."""
    tag = vtk.reference("")
    return bool(segment.GetTag(RESULT_TAG, tag)) and str(tag) == segment_fingerprint(segment)


def _nodes(scene: Any) -> list[Any]:
    return [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]


@contextmanager
def no_leftover_nodes(scene: Any):
    """Remove what a block leaves behind in the user's scene: display nodes that belong to no node any more and
    colour tables nobody uses, among the nodes the block added. Slicer's own array helpers
    (``slicer.util.arrayFromSegmentBinaryLabelmap`` / ``updateSegmentBinaryLabelmapFromArray``) and labelmap
    import / export through a temporary volume leave the temporary volume's display node (and export a colour
    table) in the scene on every call: MRML never removes a display node with its volume. Nodes that were there
    before, and everything still in use, stay."""
    before = {n.GetID() for n in _nodes(scene)}
    try:
        yield
    finally:
        new = [n for n in _nodes(scene) if n.GetID() not in before]
        for node in new:
            if node.IsA("vtkMRMLDisplayNode") and node.GetDisplayableNode() is None:
                scene.RemoveNode(node)
        used = {n.GetColorNodeID() for n in _nodes(scene) if n.IsA("vtkMRMLDisplayNode")}
        for node in new:
            if node.IsA("vtkMRMLColorNode") and scene.IsNodePresent(node) and node.GetID() not in used:
                scene.RemoveNode(node)


def segment_array(segmentation_node: Any, segment_id: str, volume: Any) -> np.ndarray:
    """The segment's voxels on the volume's grid (KJI), as ``slicer.util.arrayFromSegmentBinaryLabelmap``, without
    leaving nodes behind."""
    with no_leftover_nodes(segmentation_node.GetScene()):
        return slicer.util.arrayFromSegmentBinaryLabelmap(segmentation_node, segment_id, volume)


def set_segment_array(array: np.ndarray, segmentation_node: Any, segment_id: str, volume: Any) -> None:
    """Replace the segment's voxels (KJI array on the volume's grid), as
    ``slicer.util.updateSegmentBinaryLabelmapFromArray``, without leaving nodes behind."""
    with no_leftover_nodes(segmentation_node.GetScene()):
        slicer.util.updateSegmentBinaryLabelmapFromArray(array, segmentation_node, segment_id, volume)


def warping_transforms(node: Any, frame: Any) -> list[str] | None:
    """None when ``node``'s own RAS maps to ``frame``'s by a matrix (the same parent transforms, or only linear ones
    between them); otherwise the names of the non-linear (warping) transforms between them (a deformable
    registration's result: B-spline, grid, thin-plate spline). Transforms above both are shared: not between them."""
    def chain(n: Any) -> list[Any]:
        out, t = [], n.GetParentTransformNode()
        while t is not None:
            out.append(t)
            t = t.GetParentTransformNode()
        return out

    up, down = chain(node), chain(frame)
    shared = {t.GetID() for t in up} & {t.GetID() for t in down}
    names = [t.GetName() for t in up + down if t.GetID() not in shared and not t.IsLinear()]
    return list(dict.fromkeys(names)) or None


def frame_matrix(node: Any, frame: Any) -> np.ndarray:
    """The 4x4 that maps ``node``'s own RAS (before its parent transforms) to ``frame``'s own RAS: identity when both
    sit under the same transform (or none). A volume the user registered to another by a linear transform is written
    in the other's frame with this folded into its geometry (exact, no resampling); a non-linear (warping) transform
    cannot be folded into a matrix: callers check :func:`warping_transforms` first and resample (:func:`resampled_onto`)."""
    matrix = vtk.vtkMatrix4x4()
    if node.GetParentTransformNode() is frame.GetParentTransformNode():
        return np.eye(4)
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(node.GetParentTransformNode(),
                                                                      frame.GetParentTransformNode(), matrix):
        raise InputError(f"'{node.GetName()}' and '{frame.GetName()}' are related by a non-linear (warping) transform "
                         f"({', '.join(warping_transforms(node, frame) or [])}), which a matrix cannot describe")
    return slicer.util.arrayFromVTKMatrix(matrix)


def resampled_onto(node: Any, frame: Any) -> Any:
    """``node``'s voxels on ``frame``'s grid (its dimensions and IJKToRAS, in its own RAS), sampled through every
    transform between them, non-linear ones included, with linear interpolation (0 outside ``node``): what the user
    sees of ``node`` where ``frame`` lies, as Slicer's views show it. A new volume node outside the scene; ``node`` is
    not touched."""
    between = vtk.vtkGeneralTransform()  # frame's own RAS -> node's own RAS
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(frame.GetParentTransformNode(), node.GetParentTransformNode(),
                                                         between)
    frame_ijk_to_ras, node_ras_to_ijk = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    frame.GetIJKToRASMatrix(frame_ijk_to_ras)
    node.GetRASToIJKMatrix(node_ras_to_ijk)
    resample = vtk.vtkGeneralTransform()  # output (frame) IJK -> input (node) IJK, as vtkImageReslice asks
    resample.PostMultiply()
    resample.Concatenate(frame_ijk_to_ras)
    resample.Concatenate(between)
    resample.Concatenate(node_ras_to_ijk)
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(node.GetImageData())
    reslice.SetResliceTransform(resample)
    reslice.SetInterpolationModeToLinear()
    reslice.SetBackgroundLevel(0.0)
    reslice.SetOutputOrigin(0.0, 0.0, 0.0)
    reslice.SetOutputSpacing(1.0, 1.0, 1.0)
    reslice.SetOutputExtent(frame.GetImageData().GetExtent())
    reslice.Update()
    target = slicer.vtkMRMLScalarVolumeNode()
    target.SetName(node.GetName())
    target.SetIJKToRASMatrix(frame_ijk_to_ras)
    target.SetAndObserveImageData(reslice.GetOutput())
    return target


def warp_note(node: Any, frame: Any, names: Sequence[str]) -> str:
    """What the Done message says of a sequence that reached the model resampled through a warping transform."""
    return (f"'{node.GetName()}' was resampled through the non-linear transform {', '.join(repr(n) for n in names)} onto "
            f"the grid of '{frame.GetName()}' (linear interpolation), as the views show it")


def world_to_local(node: Any, point_ras: Sequence[float]) -> np.ndarray:
    """A world (scene) RAS point — a click, an ROI — in ``node``'s own RAS, through its parent transforms (linear or
    not), where its IJKToRAS applies."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return np.asarray(point_ras, float)
    from_world = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, transform, from_world)
    return np.asarray(from_world.TransformPoint([float(v) for v in point_ras]), float)


def follow_transform(node: Any, reference: Any) -> None:
    """Put a node made from ``reference``'s grid (a result, a crop, a QA surface) under the same parent transform, so
    that it stays aligned with ``reference`` in the views however the user has moved (registered) it."""
    node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())


def keep_name(segmentation: Any, name: str) -> str:
    """A free segment name for a kept, edited segment: '<name> (edited)', then '(edited 2)', ..."""
    candidate, n = f"{name} (edited)", 2
    while segmentation.GetSegmentIdBySegmentName(candidate):
        candidate, n = f"{name} (edited {n})", n + 1
    return candidate


DEFAULT_COLORS = [(128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210), (216, 101, 79), (221, 130, 101)]


def input_file_name(index: int) -> str:
    """The temporary file the worker reads the index-th input volume from."""
    return f"input_{index:04d}.nrrd"


def frame_file_name(index: int) -> str:
    """The temporary file the worker reads the index-th frame of a sequence from (all frames)."""
    return f"frame_{index:04d}.nrrd"


@dataclass
class SegmentationRun:
    """A worker run started by :meth:`SegmentationBridge.start`; owns its temporary folder."""

    worker: Any  # WorkerProcess (one-shot) or ServeJob (warm worker): running / poll / wait / cancel / result
    temp_dir: Path
    output: Path
    inputs: list[Any]
    card: dict[str, Any]
    segmentation_node: Any = None
    records: list[dict[str, Any]] = field(default_factory=list)
    uncertainty: Path | None = None  # voxel uncertainty map asked of the worker
    uncertainty_node: Any = None  # after finish: the overlay volume ...
    uncertainty_table: Any = None  # ... and the per-segment scores
    import_notes: list[str] = field(default_factory=list)  # what importing the result did that the user must know
    pinned: Any = None  # one frame of a cine (bridge/sequences.PinnedFrame): still shown when the result is added?
    cine: Any = None  # all frames: the sequence (bridge/sequences.Cine) and ...
    frames: list[tuple[str, Path]] = field(default_factory=list)  # ... (index value, worker output) per frame
    volumes_table: Any = None  # after an all-frames finish: the segments' volumes per frame ...
    volumes_chart: Any = None  # ... and their plot over the frames

    def cleanup(self) -> None:
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    @property
    def notes(self) -> list[str]:
        """What the worker said about a finished run that the user must know (e.g. it fell back from the GPU to the
        CPU, an input was resampled onto the first one's grid): the notes of its final "done" record."""
        done = [r for r in self.records if r.get("stage") == "done"]
        notes = [str(n) for n in done[-1].get("notes", [])] if done else []
        for i, node in enumerate(self.inputs):  # the worker saw temporary files: name the user's volumes instead
            notes = [n.replace(input_file_name(i), f"'{node.GetName()}'") for n in notes]
        for i, (value, _) in enumerate(self.frames):
            notes = [n.replace(frame_file_name(i), f"'{self.inputs[0].GetName()}' {self.cine.label(value)}")
                     for n in notes]
        return list(dict.fromkeys(notes + self.import_notes))


class SegmentationBridge:
    """Segments scene volumes with a DSD model through the background worker.

    Args:
        scene: the MRML scene (``slicer.mrmlScene`` in Slicer, a ``vtkMRMLScene`` headless).
        python: interpreter that runs the worker (Slicer: PythonSlicer); default: this one.
        temp_root: where per-run temporary folders are made (Slicer: its temporary directory setting).
        temp_hint: what a user does about a full temporary folder (CLI/headless: TMPDIR; Slicer: the setting).
        warm: keep one ``dsdseg serve`` worker with the model loaded between runs (cold start only once).
        env: extra environment of the worker (Slicer: PYTHONPATH to this package).
    """

    def __init__(self, scene: Any, python: str | None = None, temp_root: str | Path | None = None, warm: bool = True,
                 env: dict[str, str] | None = None, temp_hint: str = "set TMPDIR to a folder on a larger disk"):
        self.scene = scene
        self.python = python
        self.env = env
        self.temp_root = Path(temp_root) if temp_root else None
        self.temp_hint = temp_hint
        self.server = ServeWorker(python, env) if warm else None

    def environment(self) -> str | None:
        """What the warm worker reported when it started (torch, CUDA build, device); None before that. Slicer's
        own process never imports torch for it."""
        return self.server.environment if self.server is not None else None

    def shutdown(self) -> None:
        """Stop the warm worker (module closed or scene cleared)."""
        if self.server is not None:
            self.server.stop()

    # ------------------------------------------------------------------------------------------------ inputs
    def check_inputs(self, volume_nodes: Sequence[Any], card: dict[str, Any]) -> None:
        """Raise :class:`InputError` naming the problem if the volumes cannot be given to the model."""
        channels = card["preset"]["channels"]
        if len(volume_nodes) != len(channels):
            raise InputError(f"the model needs {len(channels)} input volume(s) ({', '.join(channels)}), "
                             f"{len(volume_nodes)} given")
        for node, channel in zip(volume_nodes, channels):
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
                raise InputError(f"input '{channel}': a scalar volume is required")
            image = node.GetImageData()
            if image is None:
                raise InputError(f"input '{channel}' ({node.GetName()}): the volume has no image data")
            if image.GetNumberOfScalarComponents() != 1:
                raise InputError(f"input '{channel}' ({node.GetName()}): {image.GetNumberOfScalarComponents()}-component "
                                 "(vector or 4D) volumes are not supported; a time series (a cine) loaded as a sequence "
                                 "is segmented frame by frame ('All frames'); otherwise extract one frame or component "
                                 "first")
            if min(image.GetDimensions()) < 2:
                raise InputError(f"input '{channel}' ({node.GetName()}): dimensions {image.GetDimensions()} are not 3D")
        for i, (node, channel) in enumerate(zip(volume_nodes, channels)):
            for other, other_channel in zip(volume_nodes[i + 1:], channels[i + 1:]):
                if other is node:
                    raise InputError(f"inputs '{channel}' and '{other_channel}' are the same volume ({node.GetName()}); "
                                     "pick each sequence once")

    def check_temp_space(self, folder: Path, nodes: Sequence[Any], outputs: int = 2) -> None:
        """Before a storage node writes anything: the folder is writable and has room for the input volumes and the
        worker's outputs (slicer-core's NRRD writer crashes the process on a full or read-only disk)."""
        import shutil as _shutil

        from ..engine.outputs import check_writable_folder

        check_writable_folder(folder, "temporary folder")
        need = 0
        for node in nodes:
            image = node.GetImageData()
            if image is not None:
                dims = image.GetDimensions()
                need += dims[0] * dims[1] * dims[2] * image.GetScalarSize() * image.GetNumberOfScalarComponents()
                need += outputs * dims[0] * dims[1] * dims[2] * 4
        need = int(need * 1.1) + (16 << 20)
        free = _shutil.disk_usage(folder).free
        if free < need:
            raise InputError(f"the temporary folder {folder} has {free / 2**20:.0f} MB free; {need / 2**20:.0f} MB are "
                             f"needed for this run ({self.temp_hint})")

    def run_folder(self, nodes: Sequence[Any]) -> Path:
        """A new temporary folder for one run, once the temporary root has room for these volumes and the outputs."""
        root = Path(self.temp_root) if self.temp_root else Path(tempfile.gettempdir())
        self.check_temp_space(root, nodes)
        try:
            return Path(tempfile.mkdtemp(prefix="dsdseg-", dir=root))
        except OSError as e:
            raise InputError(f"cannot create a temporary folder in {root}: {e.strerror or e}") from e

    def write_volume(self, node: Any, path: Path, frame: Any = None) -> Path:
        """Write a volume node with a storage node (geometry in the file header). Free space and writability are
        checked first: slicer-core's writer must never see a full or read-only folder. With ``frame`` (a model's
        first input) the geometry is written in that volume's own RAS: a linear transform between them (a
        registration) is folded into the header, the voxels and the user's node are not touched; through a
        non-linear (warping) one the voxels are resampled onto ``frame``'s grid (:func:`resampled_onto`)."""
        self.check_temp_space(Path(path).parent, [node], outputs=0)
        target = node
        if frame is not None and warping_transforms(node, frame) is not None:
            target = resampled_onto(node, frame)  # a warping registration: sampled through it onto frame's grid
        elif frame is not None and not np.allclose(matrix := frame_matrix(node, frame), np.eye(4)):
            target = slicer.vtkMRMLScalarVolumeNode()  # outside the scene; shares the image data
            target.SetName(node.GetName())
            target.SetAndObserveImageData(node.GetImageData())
            ijk_to_ras = vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(ijk_to_ras)
            target.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(matrix @ slicer.util.arrayFromVTKMatrix(ijk_to_ras)))
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetWriteFileFormat("nrrd")
        storage.SetUseCompression(False)
        if not storage.WriteData(target):
            raise InputError(f"could not write volume '{node.GetName()}' to {path}")
        return path

    def load_volume(self, path: str | Path, name: str | None = None, labelmap: bool = False) -> Any:
        """Read a volume file (NIfTI, NRRD, ...) into a new node with a storage node, as Slicer's loader does."""
        path = Path(path)
        if not path.is_file():
            raise InputError(f"volume file {path} does not exist")
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = self.scene.AddNewNodeByClass(cls, name or path.name.split(".")[0])
        storage = self.scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
        storage.SetFileName(str(path))
        node.SetAndObserveStorageNodeID(storage.GetID())
        if not storage.ReadData(node):
            self.scene.RemoveNode(node)
            self.scene.RemoveNode(storage)
            raise InputError(f"could not read volume {path}")
        node.CreateDefaultDisplayNodes()
        return node

    def save_segmentation(self, segmentation_node: Any, path: str | Path) -> Path:
        """Write a ``.seg.nrrd`` (segment names, colours and terminology kept) and keep it as the node's file."""
        storage = segmentation_node.GetStorageNode()
        if storage is None:
            segmentation_node.AddDefaultStorageNode()
            storage = segmentation_node.GetStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(segmentation_node):
            raise InputError(f"could not write the segmentation to {path}")
        return Path(path)

    def export_labelmap(self, segmentation_node: Any, reference_volume: Any, preset: dict[str, Any], path: str | Path,
                        mapping: dict[int, str] | None = None) -> Path:
        """Segments → a labelmap file on the reference volume's grid with the model's label values. ``mapping``
        (label value → segment id) defaults to matching by name; the values never depend on segment order."""
        labels = {int(k): v for k, v in preset["labels"].items()}
        segmentation = segmentation_node.GetSegmentation()
        if mapping is None:
            mapping = {v: segmentation.GetSegmentIdBySegmentName(n) for v, n in labels.items() if v}
        with no_leftover_nodes(self.scene):
            return self._export_labelmap(segmentation_node, reference_volume, labels, mapping, path)

    def _export_labelmap(self, segmentation_node: Any, reference_volume: Any, labels: dict[int, str],
                         mapping: dict[int, str], path: str | Path) -> Path:
        segmentation = segmentation_node.GetSegmentation()
        color_table = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "dsdseg_export_colors")
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "dsdseg_export")
        try:
            color_table.SetTypeToUser()
            color_table.SetNumberOfColors(max(labels) + 1)
            ids = vtk.vtkStringArray()
            for value, sid in sorted(mapping.items()):
                if value and sid:
                    # the colour table maps each segment to its label value through the segment's name
                    color_table.SetColor(value, segmentation.GetSegment(sid).GetName(), 0.5, 0.5, 0.5, 1.0)
                    ids.InsertNextValue(sid)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentation_node, ids, labelmap, reference_volume, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY,
                    color_table):
                raise InputError("exporting the segments to a labelmap failed")
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            if not storage.WriteData(labelmap):
                raise InputError(f"could not write the labelmap to {path}")
            return Path(path)
        finally:
            self.scene.RemoveNode(labelmap)
            self.scene.RemoveNode(color_table)

    # ------------------------------------------------------------------------------------------------ fine-tuning
    @staticmethod
    def match_segments(segmentation_node: Any, preset: dict[str, Any]) -> dict[int, dict[str, str]]:
        """Label value → ``{"segment_id", "segment", "by"}`` for the model's labels: by terminology (type and type
        modifier codes) first, then by name (case-insensitive); labels without a match are left out."""
        segmentation = segmentation_node.GetSegmentation()
        segments = [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i))
                    for i in range(segmentation.GetNumberOfSegments())]
        terms = preset.get("terminology") or {}

        def codes(tag: str) -> tuple[str, str]:
            parts = tag.split("~")
            if len(parts) < 4:
                return ("", "")
            return tuple(p.split("^")[1] if p.count("^") == 2 else "" for p in (parts[2], parts[3]))  # type: ignore[return-value]

        found: dict[int, dict[str, str]] = {}
        used: set[str] = set()
        for value, name in sorted((int(k), v) for k, v in preset["labels"].items()):
            if value == 0:
                continue
            entry = terms.get(str(value)) or terms.get(value)
            match = None
            if entry:
                want = (entry["type"].split("^")[1], (entry.get("type_modifier") or "^^").split("^")[1])
                match = next(((sid, seg, "terminology") for sid, seg in segments if sid not in used
                              and get_segment_terminology(seg) and codes(get_segment_terminology(seg)) == want), None)
            if match is None:
                match = next(((sid, seg, "name") for sid, seg in segments if sid not in used
                              and seg.GetName().strip().lower() == name.lower()), None)
            if match is not None:
                used.add(match[0])
                found[value] = {"segment_id": match[0], "segment": match[1].GetName(), "by": match[2]}
        return found

    def unmatched_segments(self, segmentation_node: Any, preset: dict[str, Any]) -> list[tuple[str, Any]]:
        """(segment id, segment) of the segments that match none of the model's labels: offered as new labels."""
        found = {m["segment_id"] for m in self.match_segments(segmentation_node, preset).values()}
        segmentation = segmentation_node.GetSegmentation()
        return [(segmentation.GetNthSegmentID(i), segmentation.GetNthSegment(i))
                for i in range(segmentation.GetNumberOfSegments()) if segmentation.GetNthSegmentID(i) not in found]

    @contextmanager
    def at_frame(self, volume: Any, frame: str):
        """With ``frame`` (a cine's index value, as a case of a cine was added): the volume's sequence browser shows
        that frame inside the block (its proxies, the volume and a segmentation synchronised with it, hold that
        frame's voxels and segments), and the frame shown before afterwards. Without a frame: nothing changes."""
        cine = cine_of(self.scene, volume) if frame else None
        if cine is None:
            yield
            return
        master = cine.browser.GetMasterSequenceNode()
        number = master.GetItemNumberFromIndexValue(frame) if master is not None else -1
        if number < 0:
            raise InputError(f"{cine.label(frame)} of '{volume.GetName()}' is no longer in its sequence")
        before = cine.browser.GetSelectedItemNumber()
        cine.browser.SetSelectedItemNumber(number)
        try:
            yield
        finally:
            cine.browser.SetSelectedItemNumber(before)

    def case_name(self, volume: Any, frame: str = "") -> str:
        """A case's volume as the user reads it: its name, and for a frame of a cine which frame."""
        cine = cine_of(self.scene, volume) if frame else None
        return f"{volume.GetName()} {cine.label(frame)}" if cine is not None else volume.GetName()

    @staticmethod
    def _with_frames(pairs: Sequence[tuple[Any, ...]]) -> list[tuple[Any, Any, str]]:
        """(volume, segmentation) or (volume, segmentation, frame) cases as (volume, segmentation, frame)."""
        return [(p[0], p[1], p[2] if len(p) > 2 else "") for p in pairs]

    def plan_finetune_labels(self, pairs: Sequence[tuple[Any, ...]], preset: dict[str, Any]) -> dict[str, Any]:
        """The user's label set from the cases' segments: a model label matched (terminology, then name) in every
        case is kept; one matched in no case is dropped; a segment that matches no model label is a new label —
        or a merge, when its name covers several model labels ("Hippocampus" ← anterior + posterior) — if a segment
        of that name is in every case. A label or segment in some cases only is refused, naming the case. A case
        of a cine (volume, segmentation, frame) is read at its frame."""
        from ..engine.labelmapping import derive_mapping, describe

        base = {int(k): v for k, v in preset["labels"].items()}
        pairs = self._with_frames(pairs)
        found, others = [], []
        for volume, seg, frame in pairs:
            with self.at_frame(volume, frame):
                found.append(self.match_segments(seg, preset))
                others.append(self.unmatched_segments(seg, preset))
        names = [f"case_{i + 1:03d} ({self.case_name(v, f)} / {s.GetName()})" for i, (v, s, f) in enumerate(pairs)]
        keep = []
        for value in sorted(v for v in base if v):
            have = [value in f for f in found]
            if all(have):
                keep.append(value)
            elif any(have):
                first = names[have.index(False)]
                segs = [s.GetName() for _, s in others[have.index(False)]]
                raise InputError(f"{first}: no segment for '{base[value]}' (other cases have one); its unmatched "
                                 f"segments are {segs or 'none'} (rename one, set its terminology, or remove the label "
                                 "from the other cases)")
        new: dict[str, dict[str, Any]] = {}
        for i, segs in enumerate(others):
            for sid, segment in segs:
                entry = new.setdefault(segment.GetName().strip().lower(), {"name": segment.GetName().strip(), "cases": {},
                                                                           "tag": get_segment_terminology(segment)})
                entry["cases"][i] = sid
        for key, entry in new.items():
            if len(entry["cases"]) != len(pairs):
                lacking = names[min(set(range(len(pairs))) - set(entry["cases"]))]
                raise InputError(f"{lacking}: no segment '{entry['name']}' (other cases have one); give it the same "
                                 "name in every case, or remove it")
        labels = {0: base.get(0, "background"), **{v: base[v] for v in keep}}
        spec: dict[str, Any] = {str(v): {"name": base[v], "from": [v]} for v in keep}
        value = max(keep, default=0) + 1
        per_case: list[dict[int, str]] = [{v: found[i][v]["segment_id"] for v in keep} for i in range(len(pairs))]
        for entry in new.values():
            labels[value] = entry["name"]
            derived = derive_mapping(base, {0: "background", value: entry["name"]})[1]
            spec[str(value)] = {"name": entry["name"], "from": derived.sources or "new"}
            if not derived.sources and entry["tag"]:
                spec[str(value)]["terminology"] = _entry_from_tag(entry["tag"])
            for i, sid in entry["cases"].items():
                per_case[i][value] = sid
            value += 1
        if len(labels) < 2:
            raise InputError("the segmentations hold no segment to train on")
        mapping = derive_mapping(base, labels, spec)
        return {"labels": labels, "spec": spec, "per_case": per_case, "lines": describe(mapping, base)}

    def build_finetune_dataset(self, pairs: Sequence[tuple[Any, ...]], preset: dict[str, Any], folder: str | Path,
                               mappings: Sequence[dict[int, str]] | None = None) -> dict[str, Any]:
        """Write (volume, segmentation) pairs as an MSD-layout dataset for ``dsdseg finetune``, with the user's label
        set (:meth:`plan_finetune_labels`) in ``dataset.json`` and the explicit mapping in ``label_map.json``.

        Each segmentation is exported on its volume's grid through a colour table (values never depend on segment
        order), or by ``mappings[i]`` (label value → segment id, model labels only). Refuses, naming the case and the
        problem: fewer than 2 cases, a missing or multi-channel volume, a label or segment in some cases only, an
        empty segment (or one that does not overlap its volume). Nothing is written unless every case passes.
        A case of a cine, (volume, segmentation, frame), is written at its frame (:meth:`at_frame`)."""
        pairs = self._with_frames(pairs)
        if len(pairs) < 2:
            raise InputError(f"fine-tuning needs at least 2 annotated cases (one is held out for validation), got {len(pairs)}")
        folder = Path(folder)
        if folder.exists() and any(folder.iterdir()):
            raise InputError(f"{folder} is not empty; choose a new folder for the fine-tuning dataset")
        for i, (volume, seg, _) in enumerate(pairs):
            if seg is None or volume is None:
                raise InputError(f"case_{i + 1:03d}: both a volume and a segmentation are needed")
            self.check_inputs([volume], {"preset": {"channels": preset["channels"][:1]}})
        if len(preset["channels"]) != 1:
            raise InputError("fine-tuning from the scene supports single-input models; use a dataset folder for "
                             f"{len(preset['channels'])}-input models")
        if mappings is not None:
            labels = {int(k): v for k, v in preset["labels"].items()}
            plan = {"labels": labels, "spec": None, "per_case": [{int(v): sid for v, sid in m.items() if sid} for m in mappings],
                    "lines": []}
        else:
            plan = self.plan_finetune_labels(pairs, preset)
        labels = plan["labels"]
        export_preset = {**preset, "labels": {str(k): v for k, v in labels.items()}}
        plans = [(f"case_{i + 1:03d}", volume, seg, frame, plan["per_case"][i],
                  f"case_{i + 1:03d} ({self.case_name(volume, frame)} / {seg.GetName()})")
                 for i, (volume, seg, frame) in enumerate(pairs)]
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-dataset-", dir=folder.parent))
        try:
            (tmp / "imagesTr").mkdir()
            (tmp / "labelsTr").mkdir()
            cases = []
            for case, volume, seg, frame, mapping, what in plans:
                with self.at_frame(volume, frame):
                    self.write_volume(volume, tmp / "imagesTr" / f"{case}.nrrd")
                    label = self.export_labelmap(seg, volume, export_preset, tmp / "labelsTr" / f"{case}.nrrd", mapping)
                    names = {str(v): seg.GetSegmentation().GetSegment(sid).GetName() for v, sid in mapping.items()}
                counts = self._label_counts(label)
                empty = [labels[v] for v in mapping if counts.get(v, 0) == 0]
                if empty:
                    raise InputError(f"{what}: segment(s) {', '.join(repr(e) for e in empty)} are empty on the volume's "
                                     "grid (nothing painted, or the segmentation does not overlap the volume)")
                cases.append({"image": f"./imagesTr/{case}.nrrd", "label": f"./labelsTr/{case}.nrrd",
                              "volume": self.case_name(volume, frame), "segmentation": seg.GetName(),
                              "mapping": names})
            dataset = {"name": f"fine-tuning cases for {preset['name']}", "labels": {str(k): v for k, v in labels.items()},
                       "modality": {str(i): c for i, c in enumerate(preset["channels"])}, "numTraining": len(cases),
                       "training": [{"image": c["image"], "label": c["label"]} for c in cases]}
            (tmp / "dataset.json").write_text(json.dumps(dataset, indent=2), encoding="utf-8")
            (tmp / "cases.json").write_text(json.dumps(cases, indent=2), encoding="utf-8")
            if plan["spec"] is not None:
                (tmp / "label_map.json").write_text(json.dumps(plan["spec"], indent=2), encoding="utf-8")
            if folder.exists():
                folder.rmdir()
            os.replace(tmp, folder)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return {"folder": str(folder), "cases": cases, "labels": labels, "mapping": plan["lines"],
                "label_map": str(folder / "label_map.json") if plan["spec"] is not None else None}

    @staticmethod
    def _label_counts(path: Path) -> dict[int, int]:
        node = slicer.vtkMRMLLabelMapVolumeNode()
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.ReadData(node)
        import numpy as np

        values, counts = np.unique(slicer.util.arrayFromVolume(node), return_counts=True)
        return {int(v): int(c) for v, c in zip(values, counts)}

    def start_finetune(self, base: str | Path, data: str | Path, output: str | Path, epochs: int | None = 30,
                       lr: float | None = 1e-3, dsd: str = "dsd", freeze_encoder: bool = False,
                       patience: int | None = None, device: str = "auto", store: str | Path | None = None,
                       name: str | None = None, resume: bool = False, max_steps: int | None = None,
                       label_map: str | Path | None = None) -> WorkerProcess:
        """Start ``dsdseg finetune`` in the background; its JSON lines carry ``epoch`` records (loss, validation
        Dice) for the plot. Cancel = Stop: the last finished epoch's checkpoint stays, ``resume=True`` goes on with
        the run's own settings (base, data, epochs, learning rate, terms, frozen encoder: none of them is passed)."""
        args = ["finetune", "--output", str(output), "--device", device]
        if resume:
            args += ["--resume"]
        else:
            args += ["--base", str(base), "--data", str(data), "--dsd", dsd]
            args += (["--epochs", str(epochs)] if epochs else []) + (["--lr", str(lr)] if lr else [])
            args += (["--freeze-encoder"] if freeze_encoder else [])
        args += (["--patience", str(patience)] if patience else []) + (["--store", str(store)] if store else [])
        args += (["--name", name] if name else []) + (["--max-steps", str(max_steps)] if max_steps else [])
        args += ["--label-map", str(label_map)] if label_map and not resume else []
        return WorkerProcess(args, python=self.python, env=self.env)

    def training_plot(self, name: str = "DSD fine-tune") -> tuple[Any, Any]:
        """A table node (epoch, loss, validation Dice) and a plot chart node showing both curves."""
        table = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} history")
        for column in ("epoch", "loss", "validation Dice"):
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            table.AddColumn(array)
        chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} curves")
        chart.SetTitle(name)
        chart.SetXAxisTitle("epoch")
        chart.SetYAxisTitle("loss / Dice")
        for column, color in (("loss", (0.85, 0.35, 0.2)), ("validation Dice", (0.2, 0.45, 0.85))):
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {column}")
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*color)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        return table, chart

    @staticmethod
    def add_epoch(table: Any, record: dict[str, Any]) -> None:
        """Append one ``epoch`` progress record (from the fine-tune worker) to the plot's table."""
        import math

        row = table.AddEmptyRow()
        values = (record.get("epoch", row + 1), record.get("loss/total", math.nan), record.get("val_dice", math.nan))
        for column, value in enumerate(values):
            table.GetTable().GetColumn(column).SetValue(row, float(value))
        table.GetTable().Modified()
        table.Modified()

    # ------------------------------------------------------------------------------------------------ worker
    def start(self, volume_nodes: Sequence[Any], model: str | Path, device: str = "auto", tta: bool = False,
              segmentation_node: Any = None, uncertainty: bool = False, all_frames: bool = False) -> SegmentationRun:
        """Write the inputs and start the worker; poll ``run.worker`` and call :meth:`finish` when it ends.
        With ``uncertainty`` the worker also writes a voxel uncertainty map, loaded as an overlay by finish.
        With ``all_frames`` the first input must show a sequence (a cine series): every frame is segmented, and
        finish makes a segmentation sequence shown frame by frame by the same browser (see :meth:`start_frames`)."""
        card = verify_package(model) if (Path(model) / "model.json").is_file() else read_model_card(model)
        if all_frames:
            return self.start_frames(volume_nodes, model, card, device, tta, uncertainty)
        self.check_inputs(volume_nodes, card)
        pinned = pin_frame(self.scene, volume_nodes[0])
        temp_dir = self.run_folder(volume_nodes)
        try:
            # every input in the first one's frame: the result comes back on its grid and follows its transform
            files = [self.write_volume(n, temp_dir / input_file_name(i), frame=volume_nodes[0])
                     for i, n in enumerate(volume_nodes)]
            output = temp_dir / "segmentation.nrrd"
            unc = temp_dir / "uncertainty.nrrd" if uncertainty else None
            if self.server is not None:
                request = {"command": "predict", "model": str(model), "inputs": [str(f) for f in files],
                           "output": str(output), "device": device, "tta": tta}
                if unc:
                    request["uncertainty"] = str(unc)
                worker = self.server.submit(request)
            else:
                args = ["predict", "--model", str(model), "-o", str(output), "--device", device]
                args += [a for f in files for a in ("-i", str(f))] + (["--tta"] if tta else [])
                args += ["--uncertainty", str(unc)] if unc else []
                worker = WorkerProcess(args, python=self.python, env=self.env)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        notes = [warp_note(n, volume_nodes[0], names) for n in volume_nodes[1:]
                 if (names := warping_transforms(n, volume_nodes[0])) is not None]
        return SegmentationRun(worker, temp_dir, output, list(volume_nodes), card, segmentation_node, uncertainty=unc,
                               import_notes=notes, pinned=pinned)

    def start_frames(self, volume_nodes: Sequence[Any], model: str | Path, card: dict[str, Any], device: str,
                     tta: bool, uncertainty: bool) -> SegmentationRun:
        """Every frame of the sequence the first input shows, in one worker request (the model loads once; one
        progress bar over the frames; Cancel stops between and within frames, and nothing is added)."""
        volume = volume_nodes[0] if volume_nodes else None
        cine = cine_of(self.scene, volume)
        if cine is None:
            raise InputError(f"'{volume.GetName() if volume is not None else 'the input'}' is not a sequence (a cine or "
                             "other 4D series loaded as a sequence): 'All frames' needs one; uncheck it to segment "
                             "this volume")
        if len(card["preset"]["channels"]) != 1:
            raise InputError("'All frames' works with one-input models; this model needs "
                             f"{len(card['preset']['channels'])} input volumes")
        if uncertainty:
            raise InputError("the uncertainty map is made for one frame: uncheck 'All frames'")
        frames = cine.frames()
        if not frames:
            raise InputError(f"the sequence '{cine.sequence.GetName()}' has no frames")
        for value, node in frames:
            if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
                raise InputError(f"{cine.label(value)} of '{cine.sequence.GetName()}' is not a scalar volume")
            self.check_inputs([node], card)
        temp_dir = self.run_folder([node for _, node in frames])
        try:
            # each frame in its own RAS: the proxy shows it there, under the proxy's transform
            files = [self.write_volume(node, temp_dir / frame_file_name(i)) for i, (_, node) in enumerate(frames)]
            outputs = [temp_dir / f"segmentation_{i:04d}.nrrd" for i in range(len(frames))]
            names = [f"{cine.label(value)}, {i + 1} of {len(frames)}" for i, (value, _) in enumerate(frames)]
            if self.server is not None:
                worker = self.server.submit({"command": "predict", "model": str(model), "device": device, "tta": tta,
                                             "cases": [{"inputs": [str(f)], "output": str(o), "name": n}
                                                       for f, o, n in zip(files, outputs, names)]})
            else:
                listing = temp_dir / "frames.json"
                listing.write_text(json.dumps([{"id": o.name[:-len(".nrrd")], "image": str(f)}
                                               for f, o in zip(files, outputs)]), encoding="utf-8")
                args = ["predict", "--model", str(model), "--batch", str(listing), "--output-dir", str(temp_dir),
                        "--allow-input-folder", "--format", ".nrrd", "--device", device] + (["--tta"] if tta else [])
                worker = WorkerProcess(args, python=self.python, env=self.env)
        except BaseException:
            shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        return SegmentationRun(worker, temp_dir, outputs[0], [volume], card, None, cine=cine,
                               frames=[(value, o) for (value, _), o in zip(frames, outputs)])

    def cancel(self, run: SegmentationRun) -> None:
        """Stop the worker and its children and remove the temporary files; no node is created."""
        run.worker.cancel()
        run.worker.wait()
        run.cleanup()

    def finish(self, run: SegmentationRun) -> Any:
        """After the worker ended: import its labelmap (or raise with its message) and clean up."""
        steps = self.finish_steps(run)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                return done.value

    def finish_steps(self, run: SegmentationRun) -> Generator[tuple[int, int], None, Any]:
        """:meth:`finish` one step at a time: yields (frames imported, frames) after each frame of an all-frames run
        and returns the segmentation, so that the panel's timer imports one frame per tick and Slicer's event loop
        runs in between (a one-frame result is imported in the first step). Closing the generator part-way removes
        what it added."""
        try:
            result: WorkerResult = run.worker.wait()
            run.records = result.records
            result.raise_for_status("segmentation")  # bad input: InputError; out of memory / crash: WorkerError
            self.check_still_present(run.inputs)
            if run.frames:
                return (yield from self.import_frames(run))
            if run.pinned is not None:
                run.pinned.check(run.inputs[0])
            target = self.present(run.segmentation_node, run.import_notes, run.inputs[0])
            seg = self.import_labelmap(run.output, run.inputs[0], run.card["preset"], target, notes=run.import_notes)
            if run.uncertainty is not None:
                from .qa_logic import QALogic

                labels = {int(k): v for k, v in run.card["preset"]["labels"].items()}
                run.uncertainty_node, run.uncertainty_table = QALogic(self.scene).uncertainty_overlay(
                    run.uncertainty, seg, run.inputs[0], labels)
            return seg
        finally:
            run.cleanup()

    def import_frames(self, run: SegmentationRun) -> Generator[tuple[int, int], None, Any]:
        """All frames: a new segmentation sequence (never an existing one), one segmentation per frame, shown by the
        input's browser through a new proxy segmentation (named after the input, under its transform), with edits
        in Segment Editor saved into the frame shown; a table of the segments' volumes per frame; for ventricles,
        the ejection fraction in the notes. Yields after each frame; returns the proxy segmentation."""
        volume, cine, preset = run.inputs[0], run.cine, run.card["preset"]
        if not self.scene.IsNodePresent(cine.sequence) or not self.scene.IsNodePresent(cine.browser):
            raise InputError(f"the sequence of '{volume.GetName()}' was removed from the scene while segmenting; "
                             "nothing was added")
        frames = dict(cine.frames())
        labels = [v for k, v in sorted((int(k), v) for k, v in preset["labels"].items()) if k]
        made: list[Any] = []
        try:
            sequence = self.scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{volume.GetName()} segmentation sequence")
            made.append(sequence)
            sequence.SetIndexName(cine.sequence.GetIndexName())
            sequence.SetIndexUnit(cine.sequence.GetIndexUnit())
            sequence.SetIndexType(cine.sequence.GetIndexType())
            volumes = []
            for value, path in run.frames:
                if frames.get(value) is None:
                    raise InputError(f"{cine.label(value)} was removed from '{cine.sequence.GetName()}' while "
                                     "segmenting; nothing was added")
                with no_leftover_nodes(self.scene):  # the item's display node, made by the import, goes with it
                    item = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} segmentation")
                    item.SetAttribute(MADE_FOR, volume.GetID())  # the browser copies an item's attributes to the proxy
                    try:
                        self._import_labelmap(path, frames[value], preset, item, show_3d=True, notes=None, place=False)
                        volumes.append(segment_volumes_ml(item))
                        sequence.SetDataNodeAtValue(item, value)  # a copy in the sequence's own scene
                    finally:
                        self.scene.RemoveNode(item)
                yield len(volumes), len(run.frames)
            proxy = self.new_segmentation(volume)
            made.append(proxy)
            cine.browser.AddProxyNode(proxy, sequence, False)
            cine.browser.SetOverwriteProxyName(sequence, False)
            cine.browser.SetSaveChanges(sequence, True)  # corrections in Segment Editor stay with their frame
            self.place_beside(sequence, volume)
            sequences = getattr(slicer.modules, "sequences", None)
            if sequences is not None:  # Slicer's logic does this on the browser's next change; show the frame now
                sequences.logic().UpdateProxyNodesFromSequences(cine.browser)
            values = [value for value, _ in run.frames]
            run.volumes_table = volume_table(self.scene, f"{volume.GetName()} segment volumes per frame", cine, values,
                                             volumes, labels)
            made.append(run.volumes_table)
            self.place_beside(run.volumes_table, volume)
            colors = {preset["labels"][k]: tuple(v) for k, v in (preset.get("label_colors") or {}).items()
                      if k in preset["labels"]}
            run.volumes_chart = volume_chart(self.scene, run.volumes_table, labels, colors)
            made.append(run.volumes_chart)
            made.extend(run.volumes_chart.GetNthPlotSeriesNode(i)
                        for i in range(run.volumes_chart.GetNumberOfPlotSeriesNodes()))
            run.import_notes.extend(ejection_fractions(cine, values, volumes, run.card))
            return proxy
        except BaseException:  # nothing half-made stays: the browser lets go of the new sequence, its nodes go
            if made and self.scene.IsNodePresent(cine.browser) and cine.browser.IsSynchronizedSequenceNode(made[0]):
                cine.browser.RemoveSynchronizedSequenceNode(made[0].GetID())
            for node in made:
                if self.scene.IsNodePresent(node):
                    self.scene.RemoveNode(node)
            raise

    def check_still_present(self, volumes: Sequence[Any]) -> None:
        """Before a result is added: its input volumes are still in the scene. One the user deleted while the worker
        ran has no place for the result to lie on; nothing is added and the message says why."""
        for volume in volumes:
            if not self.scene.IsNodePresent(volume):
                raise InputError(f"the input volume '{volume.GetName()}' was removed from the scene while segmenting; "
                                 "nothing was added")

    def present(self, segmentation_node: Any, notes: list[str], volume: Any = None) -> Any:
        """The segmentation a result goes into: the chosen output segmentation, or None (a new one, ``notes`` says why)
        if the user removed it while the worker ran (the result would go into a node nobody can see any more) or if
        this module made it for another input volume (the panel keeps its last result selected as the output: a
        result for the next patient must not replace that one's segments in a node named after it). A segmentation
        the user made and chose is always written to."""
        if segmentation_node is None:
            return None
        if not self.scene.IsNodePresent(segmentation_node):
            notes.append(f"the output segmentation '{segmentation_node.GetName()}' was removed meanwhile; the result "
                         "is in a new segmentation")
            return None
        made_for = segmentation_node.GetAttribute(MADE_FOR)
        if volume is not None and made_for and made_for != volume.GetID():
            other = self.scene.GetNodeByID(made_for)
            notes.append(f"'{segmentation_node.GetName()}' holds the result for "
                         f"'{other.GetName() if other is not None else 'another volume'}' and was left as it is; the "
                         f"result for '{volume.GetName()}' is in a new segmentation")
            return None
        return segmentation_node

    def new_segmentation(self, volume: Any) -> Any:
        """A new segmentation for a result on ``volume``: named after it, under its transform, beside it in the subject
        hierarchy, and marked as made for it (see :meth:`present`)."""
        seg = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{volume.GetName()} segmentation")
        seg.CreateDefaultDisplayNodes()
        follow_transform(seg, volume)
        seg.SetAttribute(MADE_FOR, volume.GetID())
        return seg

    def segment(self, volume_nodes: Sequence[Any], model: str | Path, device: str = "auto", tta: bool = False,
                segmentation_node: Any = None, on_progress: Callable[[dict[str, Any]], None] | None = None,
                all_frames: bool = False) -> Any:
        """Blocking convenience (headless, scripts): start, forward progress, finish."""
        run = self.start(volume_nodes, model, device, tta, segmentation_node, all_frames=all_frames)
        try:
            while run.worker.running:
                for rec in run.worker.poll():
                    if on_progress:
                        on_progress(rec)
                time.sleep(0.05)
        except BaseException:
            self.cancel(run)
            raise
        return self.finish(run)

    # ------------------------------------------------------------------------------------------------ results
    def place_beside(self, node: Any, reference: Any) -> None:
        """Put ``node`` in the subject hierarchy under the same parent (study) as ``reference``."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if sh is None:
            return
        ref_item = sh.GetItemByDataNode(reference)
        parent = sh.GetItemParent(ref_item) if ref_item else sh.GetSceneItemID()
        item = sh.GetItemByDataNode(node) or sh.CreateItem(parent, node)  # headless scenes make no items by themselves
        sh.SetItemParent(item, parent)

    @staticmethod
    def apply_terminology(segmentation_node: Any, preset: dict[str, Any]) -> None:
        """Tag each model segment (found by its label name) with the card's coded terminology."""
        segmentation = segmentation_node.GetSegmentation()
        labels = {int(k): v for k, v in preset["labels"].items()}
        for value, entry in (preset.get("terminology") or {}).items():
            sid = segmentation.GetSegmentIdBySegmentName(labels[int(value)])
            if not sid:
                continue  # label absent from this result
            set_segment_terminology(segmentation.GetSegment(sid), tag_string(entry))

    def import_labelmap(self, path: str | Path, reference_volume: Any, preset: dict[str, Any], segmentation_node: Any = None,
                        show_3d: bool = True, notes: list[str] | None = None) -> Any:
        """Labelmap file → segments named and coloured from the preset, on the reference volume's geometry.

        A new segmentation node is created next to the input unless ``segmentation_node`` is given; then a segment
        with one of the model's names is replaced only if it is a model's result that nobody has edited since
        (its fingerprint, ``RESULT_TAG``, still matches). One the user edited in Segment Editor, or made
        themselves, is kept, renamed '<name> (edited)', and ``notes`` says so; all other segments are kept as well.
        """
        with no_leftover_nodes(self.scene):
            return self._import_labelmap(path, reference_volume, preset, segmentation_node, show_3d, notes)

    def _import_labelmap(self, path: str | Path, reference_volume: Any, preset: dict[str, Any], segmentation_node: Any,
                         show_3d: bool, notes: list[str] | None, place: bool = True) -> Any:
        labels = {int(k): v for k, v in preset["labels"].items()}
        colors = {int(k): v for k, v in (preset.get("label_colors") or {}).items()}
        labelmap = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "dsdseg_labelmap")
        color_table = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "dsdseg_colors")
        try:
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(path))
            if not storage.ReadData(labelmap):
                raise InputError(f"could not read the worker's result {path}")
            color_table.SetTypeToUser()
            color_table.SetNumberOfColors(max(labels) + 1)
            for value, name in labels.items():
                r, g, b = colors.get(value, DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]) if value else (0, 0, 0)
                color_table.SetColor(value, name, r / 255.0, g / 255.0, b / 255.0, 0.0 if value == 0 else 1.0)
            labelmap.CreateDefaultDisplayNodes()
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(color_table.GetID())
            follow_transform(labelmap, reference_volume)  # the file is on the reference's grid, in its own RAS
            seg = segmentation_node
            if seg is None:
                seg = self.new_segmentation(reference_volume)
            else:
                segmentation = seg.GetSegmentation()
                for value, name in labels.items():
                    sid = segmentation.GetSegmentIdBySegmentName(name) if value else ""
                    if not sid:
                        continue
                    if is_unchanged_result(segmentation.GetSegment(sid)):
                        segmentation.RemoveSegment(sid)
                    else:
                        kept = keep_name(segmentation, name)
                        segmentation.GetSegment(sid).SetName(kept)
                        if notes is not None:
                            notes.append(f"your edited segment '{name}' was kept as '{kept}'")
            if seg.GetParentTransformNode() is reference_volume.GetParentTransformNode():
                # (under another transform, the segmentation keeps its geometry; the import maps the labels into it)
                seg.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, seg):
                raise InputError("importing the labelmap into the segmentation failed")
            segmentation = seg.GetSegmentation()
            for value, name in labels.items():
                sid = segmentation.GetSegmentIdBySegmentName(name) if value else ""
                if sid:
                    segment = segmentation.GetSegment(sid)
                    segment.SetTag(RESULT_TAG, segment_fingerprint(segment) or "")
            self.apply_terminology(seg, preset)
            if place:
                self.place_beside(seg, reference_volume)
            if show_3d:
                seg.CreateClosedSurfaceRepresentation()
            return seg
        finally:
            self.scene.RemoveNode(labelmap)
            self.scene.RemoveNode(color_table)
