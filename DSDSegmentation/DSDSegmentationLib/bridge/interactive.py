"""Click or ROI prompts (Qt-free): segment a region of a volume and paste the result into a full-grid segmentation.

A region is a box in physical (RAS) space: centred on a click with the model's field of view (``roi.size_mm`` of
its card), or a markups ROI. The box is mapped to voxel indices of the volume whatever its IJKToRAS (oblique
included), clamped at the borders, cropped, segmented by the same worker as a full run, and pasted back: only the
voxels inside the region change. For models whose structure comes in two copies (hippocampus), the side is taken
from the volume's RAS frame (the click's x against the volume's centre: x > centre is the patient's right; only
for volumes at least twice the field of view wide), so a second click on the other side adds new segments
instead of replacing the first.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import slicer
import vtk

from ..engine.cards import read_model_card
from ..engine.errors import InputError
from ..engine.terminology import tag_string
from .sequences import pin_frame
from .terminology import get_segment_terminology, set_segment_terminology
from .logic import (DEFAULT_COLORS, RESULT_TAG, SegmentationBridge, SegmentationRun, follow_transform, frame_matrix,
                    is_unchanged_result, keep_name, segment_array, segment_fingerprint, set_segment_array,
                    warping_transforms, world_to_local)

SIDES = {"left": "SCT^7771000^Left", "right": "SCT^24028007^Right"}


@dataclass
class RegionRun:
    """A running region segmentation: the worker run on the crop plus where to paste it."""

    run: SegmentationRun
    volume: Any
    crops: list[Any]  # the volumes made for the run (removed after it): the clicked volume's box, then the
    # other sequences' (one related by a warping transform is given whole, not cropped)
    lo: tuple[int, int, int]  # IJK start (inclusive)
    hi: tuple[int, int, int]  # IJK end (exclusive)
    side: str | None
    segmentation_node: Any


def _matrix(volume: Any, which: str) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    getattr(volume, f"Get{which}Matrix")(m)
    return slicer.util.arrayFromVTKMatrix(m)


def region_ijk(volume: Any, center_ras: Sequence[float], size_mm: Sequence[float],
               frame: Any = None) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """IJK bounds [lo, hi) of the RAS box ``center ± size/2`` in ``volume``, clamped to the volume. ``center_ras`` is
    in world (scene) coordinates, where the user clicked; the box's axes are those of ``frame``'s own RAS (default:
    the volume's), through parent transforms: a further sequence registered to the clicked one by a rotation gets
    the voxels that cover the clicked one's box. Raises if the centre is outside the volume."""
    dims = volume.GetImageData().GetDimensions()
    frame = volume if frame is None else frame
    inside(volume, center_ras)
    to_volume = frame_matrix(frame, volume)  # frame's own RAS -> the volume's own RAS (identity: the same)
    ras_to_ijk = _matrix(volume, "RASToIJK") @ to_volume
    center = world_to_local(frame, center_ras)
    half = np.asarray(size_mm, float) / 2
    corners = [ras_to_ijk @ np.array([*(center + np.array(s) * half), 1.0]) for s in itertools.product((-1, 1), repeat=3)]
    ijk = np.array([p[:3] for p in corners])
    lo = np.maximum(np.floor(ijk.min(0) + 0.5), 0).astype(int)
    hi = np.minimum(np.ceil(ijk.max(0) + 0.5), dims).astype(int)
    if np.any(hi - lo < 2):
        raise InputError("the region is too thin inside the volume; click further from the border")
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi)  # type: ignore[return-value]


def inside(volume: Any, point_ras: Sequence[float]) -> None:
    """Raise if the world point (through ``volume``'s parent transforms, warping ones included) is outside it."""
    c = _matrix(volume, "RASToIJK") @ np.array([*world_to_local(volume, point_ras), 1.0])
    if any(v < -0.5 or v > d - 0.5 for v, d in zip(c[:3], volume.GetImageData().GetDimensions())):
        raise InputError(f"the point {tuple(round(float(v), 1) for v in point_ras)} (RAS) is outside the volume "
                         f"'{volume.GetName()}'; click inside it")


def side_of(volume: Any, point_ras: Sequence[float], size_mm: Sequence[float]) -> str | None:
    """'right' or 'left' from the volume's own RAS frame (``point_ras``, in world coordinates, is mapped through its
    parent transform): x greater than the volume centre's x is the patient's right. None when the volume is less
    than twice the field of view wide in x (a crop around one structure: no midline in it)."""
    point_ras = world_to_local(volume, point_ras)
    dims = volume.GetImageData().GetDimensions()
    m = _matrix(volume, "IJKToRAS")
    xs = [(m @ np.array([*c, 1.0]))[0] for c in itertools.product(*[(0, d - 1) for d in dims])]
    if max(xs) - min(xs) < 2 * float(size_mm[0]):
        return None
    centre = m @ np.array([(d - 1) / 2 for d in dims] + [1.0])
    return "right" if point_ras[0] > centre[0] else "left"


class InteractiveLogic:
    """Region runs on top of the module's bridge (same warm worker, same import rules)."""

    def __init__(self, bridge: SegmentationBridge):
        self.bridge = bridge
        self.scene = bridge.scene

    def crop(self, volume: Any, lo: Sequence[int], hi: Sequence[int]) -> Any:
        """A new volume node holding voxels [lo, hi) of ``volume`` with the matching geometry."""
        arr = slicer.util.arrayFromVolume(volume)  # KJI
        sub = np.ascontiguousarray(arr[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]])
        node = self.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{volume.GetName()} region")
        slicer.util.updateVolumeFromArray(node, sub)
        m = _matrix(volume, "IJKToRAS")
        m[:3, 3] = (m @ np.array([lo[0], lo[1], lo[2], 1.0]))[:3]
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
        follow_transform(node, volume)  # a crop lies where its volume lies (the bridge writes it in the first's frame)
        return node

    def start(self, volume: Any, model: str | Path, center_ras: Sequence[float], size_mm: Sequence[float] | None = None,
              segmentation_node: Any = None, device: str = "auto", others: Sequence[Any] = ()) -> RegionRun:
        """Crop around ``center_ras`` (size: ``size_mm`` or the card's field of view) and start the worker.

        ``others``: a multi-sequence model's further inputs (e.g. T1, T1c, T2 after FLAIR), each cropped to the same
        RAS box on its own grid; the worker resamples a crop on another grid onto the first one's (with a note).
        The result is pasted on ``volume``'s grid."""
        card = read_model_card(model)
        channels = list(card["preset"]["channels"])
        if len(others) != len(channels) - 1 or any(o is None for o in others):
            raise InputError(f"the model needs {len(channels)} input volumes ({', '.join(channels)}); select every "
                             "input volume before clicking")
        roi = card["preset"].get("roi") or {}
        size = size_mm or roi.get("size_mm")
        if size is None:
            raise InputError("this model's card gives no field of view; draw an ROI instead of a single click")
        pinned = pin_frame(self.scene, volume)
        lo, hi = region_ijk(volume, center_ras, size)
        # the clicked volume's box in each further sequence (raises for a point outside any of them); one related to
        # the clicked volume by a warping registration goes whole: the bridge samples it onto the box's grid
        boxes = [region_ijk(other, center_ras, size, frame=volume) if warping_transforms(other, volume) is None
                 else inside(other, center_ras) for other in others]
        side = side_of(volume, center_ras, size) if roi.get("sides") else None
        crops: list[Any] = []
        try:
            crops.append(self.crop(volume, lo, hi))
            inputs = [crops[0]]
            for other, box in zip(others, boxes):
                if box is None:
                    inputs.append(other)
                else:
                    crops.append(self.crop(other, *box))
                    inputs.append(crops[-1])
            run = self.bridge.start(inputs, model, device=device)
        except BaseException:
            self._remove(crops)
            raise
        run.pinned = pinned  # the crop is of the frame shown now: checked again at the end
        return RegionRun(run, volume, crops, lo, hi, side, segmentation_node)

    def _remove(self, nodes: Sequence[Any]) -> None:
        for node in nodes:
            self.scene.RemoveNode(node)

    def start_roi(self, volume: Any, model: str | Path, roi_node: Any, segmentation_node: Any = None,
                  device: str = "auto", others: Sequence[Any] = ()) -> RegionRun:
        """Segment inside a markups ROI (its axis-aligned RAS bounds)."""
        bounds = [0.0] * 6
        roi_node.GetRASBounds(bounds)
        center = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
        size = [bounds[1] - bounds[0], bounds[3] - bounds[2], bounds[5] - bounds[4]]
        return self.start(volume, model, center, size, segmentation_node, device, others)

    def cancel(self, region: RegionRun) -> None:
        self.bridge.cancel(region.run)
        self._remove(region.crops)

    def finish(self, region: RegionRun, previous: RegionRun | None = None) -> Any:
        """Paste the region's labels into the full-grid segmentation (created beside the volume if none).
        ``previous``: the earlier run of the same prompt (a moved point or ROI), whose region is cleared first."""
        run = region.run
        try:
            result = run.worker.wait()
            run.records = result.records
            result.raise_for_status("segmentation")  # bad input: InputError; out of memory / crash: WorkerError
            self.bridge.check_still_present([region.volume])
            if run.pinned is not None:
                run.pinned.check(region.volume)
            labelmap = slicer.vtkMRMLLabelMapVolumeNode()
            storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
            storage.SetFileName(str(run.output))
            if not storage.ReadData(labelmap):
                raise InputError(f"could not read the worker's result {run.output}")
            labels = slicer.util.arrayFromVolume(labelmap)
            earlier = previous.segmentation_node if previous is not None else None
            region.segmentation_node = self.bridge.present(region.segmentation_node or earlier, run.import_notes,
                                                           region.volume)
            if region.segmentation_node is not None:  # before anything is cleared or pasted
                self.keep_edited(region.segmentation_node, run.card["preset"], region.side, region.volume,
                                 run.import_notes)
            if earlier is not None and self.scene.IsNodePresent(earlier):  # a removed one has nothing left to clear
                self.clear(previous, run.card["preset"])
            return self.paste(region, labels, run.card["preset"])
        finally:
            run.cleanup()
            self._remove(region.crops)

    def keep_edited(self, seg: Any, preset: dict[str, Any], side: str | None, volume: Any, notes: list[str]) -> None:
        """A click writes into the segments of the model's names (its region, and a moved prompt's old region). One
        the user edited since a model wrote it, or drew themselves under such a name, is first copied whole to
        '<name> (edited)' (same colour and terminology), so that none of the user's voxels is lost; ``notes`` says so.
        The segment itself then takes the new result as usual."""
        segmentation = seg.GetSegmentation()
        for value, name in sorted((int(k), v) for k, v in preset["labels"].items()):
            full_name = f"{side} {name}" if side else name
            sid = segmentation.GetSegmentIdBySegmentName(full_name) if value else ""
            if not sid or is_unchanged_result(segmentation.GetSegment(sid)):
                continue
            segment = segmentation.GetSegment(sid)
            kept = keep_name(segmentation, full_name)
            copy_id = segmentation.AddEmptySegment("", kept, segment.GetColor())
            terminology = get_segment_terminology(segment)
            if terminology:
                set_segment_terminology(segmentation.GetSegment(copy_id), terminology)
            voxels = segment_array(seg, sid, volume).astype(np.uint8)
            set_segment_array(voxels, seg, copy_id, volume)
            notes.append(f"your edited segment '{full_name}' was kept as a copy, '{kept}'")

    def clear(self, region: RegionRun, preset: dict[str, Any]) -> None:
        """Erase what an earlier region run of the same prompt wrote (its segments, inside its region only)."""
        seg = region.segmentation_node
        segmentation = seg.GetSegmentation()
        for value, name in ((int(k), v) for k, v in preset["labels"].items()):
            sid = segmentation.GetSegmentIdBySegmentName(f"{region.side} {name}" if region.side else name)
            if value == 0 or not sid:
                continue
            full = segment_array(seg, sid, region.volume).astype(np.uint8)
            lo, hi = region.lo, region.hi
            full[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = 0
            set_segment_array(full, seg, sid, region.volume)

    def paste(self, region: RegionRun, labels: np.ndarray, preset: dict[str, Any]) -> Any:
        volume, lo, hi = region.volume, region.lo, region.hi
        seg = region.segmentation_node
        if seg is None:
            seg = self.bridge.new_segmentation(volume)
            seg.SetReferenceImageGeometryParameterFromVolumeNode(volume)
            self.bridge.place_beside(seg, volume)
            region.segmentation_node = seg
        segmentation = seg.GetSegmentation()
        colors = {int(k): v for k, v in (preset.get("label_colors") or {}).items()}
        terms = {int(k): v for k, v in (preset.get("terminology") or {}).items()}
        dims = volume.GetImageData().GetDimensions()
        for value, name in sorted((int(k), v) for k, v in preset["labels"].items()):
            if value == 0:
                continue
            full_name = f"{region.side} {name}" if region.side else name
            sid = segmentation.GetSegmentIdBySegmentName(full_name)
            if sid:
                full = segment_array(seg, sid, volume).astype(np.uint8)
            else:
                rgb = colors.get(value, DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)])
                sid = segmentation.AddEmptySegment("", full_name, [c / 255.0 for c in rgb])
                full = np.zeros((dims[2], dims[1], dims[0]), np.uint8)
                if value in terms:
                    entry = dict(terms[value])
                    if region.side:
                        entry["region"] = entry.get("region") or entry["type"]
                        entry["region_modifier"] = SIDES[region.side]
                    set_segment_terminology(segmentation.GetSegment(sid), tag_string(entry))
            full[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = (labels == value)
            set_segment_array(full, seg, sid, volume)
            # a model's result from now on (a user-edited version was copied by ``keep_edited`` first): a later Apply
            # or click may replace it until the user edits it
            segment = segmentation.GetSegment(sid)
            segment.SetTag(RESULT_TAG, segment_fingerprint(segment) or "")
        return seg

    def segment_at(self, volume: Any, model: str | Path, center_ras: Sequence[float], size_mm: Sequence[float] | None = None,
                   segmentation_node: Any = None, device: str = "auto", others: Sequence[Any] = ()) -> tuple[Any, RegionRun]:
        """Blocking: crop, segment, paste. Returns the segmentation and the finished region run."""
        region = self.start(volume, model, center_ras, size_mm, segmentation_node, device, others)
        try:
            while region.run.worker.running:
                region.run.worker.poll()
                time.sleep(0.02)
        except BaseException:
            self.cancel(region)
            raise
        return self.finish(region), region
