"""Panel controllers: every decision of the module's panel, Qt-free, on MRML only.

One controller per panel section (segment, click/ROI, QA, fine-tune) and one :class:`ProcessingState` that all
four kinds of run share, changed through one setter. The widget binds widgets to the parameter node and calls
these; it decides nothing. Controllers observe real MRML events (markups control points, scene close), take their
settings from the parameter node (any object with the fields of ``DSDSegmentationParameterNode``) and are tested
headless on a slicer-core scene with the same event sequences Slicer produces.

Time comes in as an argument (``tick(now)``), so the widget's QTimer drives debouncing and polling and the tests
drive them with their own clock.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import slicer

from ..engine.errors import Cancelled, InputError
from ..worker.process import WorkerError

# Every setting the panel uses, with its default: the module's parameter node declares exactly these fields
# (a test compares them), and headless code may pass any object that has them.
PARAMETERS: dict[str, Any] = {
    "inputVolume0": None, "inputVolume1": None, "inputVolume2": None, "inputVolume3": None,
    "outputSegmentation": None, "allFrames": False, "modelPath": "", "device": "auto", "tta": False, "show3D": True,
    "liveRerun": True, "qaSegmentation": None, "qaReference": None, "qaVolume": None, "qaToleranceMm": 1.0,
    "finetuneVolume": None, "finetuneSegmentation": None, "finetuneFolder": "", "finetuneEpochs": 30,
    "finetuneLearningRate": 0.001, "finetuneDSD": False, "finetuneFreezeEncoder": False, "finetuneName": "",
}

# The numeric settings' bounds, with the panel's words for them. Slicer's parameter node GUI connectors set a spin
# box's range from its field's annotation and, without a WithinRange, to +/-inf or +/-2**31 (Slicer 5.10,
# parameterNodeWrapper/guiConnectors.py), whatever the .ui says; so the module annotates each field with these bounds
# (a test compares them with this table and the .ui), and the controllers refuse a value outside them (headless).
RANGES: dict[str, tuple[str, float, float]] = {
    "finetuneEpochs": ("Epochs", 1, 2000),
    "finetuneLearningRate": ("Learning rate", 1e-5, 0.1),
    "qaToleranceMm": ("Surface Dice tolerance (mm)", 0.1, 20.0),
}


def bounded(params: Any, name: str) -> float:
    """The value of a numeric setting, or an InputError naming the setting and its range."""
    label, low, high = RANGES[name]
    value = getattr(params, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise InputError(f"{label} must be between {low:g} and {high:g}, not {value!r}.")
    return value


SEGMENT, PROMPT, UNCERTAINTY, FINETUNE, QA = "segment", "prompt", "uncertainty", "finetune", "qa"
KINDS = (SEGMENT, PROMPT, UNCERTAINTY, FINETUNE, QA)
IDLE, STARTING, RUNNING, IMPORTING, DONE, CANCELLED, FAILED = (
    "idle", "starting", "running", "importing", "done", "cancelled", "failed")
ACTIVE = (STARTING, RUNNING, IMPORTING)
DEBOUNCE_S = 0.3  # a burst of prompt moves runs once, this long after the last
MIN_ROI_MM = 1e-3  # an ROI being placed has zero size until its second corner


@dataclass
class RunState:
    status: str = IDLE
    message: str = ""
    done: int = 0
    total: int = 0
    out_of_memory: bool = False  # the last failure was (most likely) out of memory

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


class ProcessingState:
    """What each kind of run is doing. ``set`` is the only way to change it; listeners (the widget) are told."""

    def __init__(self) -> None:
        self.runs: dict[str, RunState] = {k: RunState() for k in KINDS}
        self._listeners: list[Callable[[str, RunState], None]] = []

    def add_listener(self, callback: Callable[[str, RunState], None]) -> None:
        self._listeners.append(callback)

    def set(self, kind: str, status: str, message: str | None = None, done: int | None = None, total: int | None = None,
            out_of_memory: bool = False) -> None:
        if kind not in self.runs:
            raise ValueError(f"unknown run kind {kind!r}")
        run = self.runs[kind]
        run.status = status
        if message is not None:
            run.message = message
        if status == STARTING:
            run.done, run.total = 0, 0
        if done is not None:
            run.done = done
        if total is not None:
            run.total = total
        run.out_of_memory = out_of_memory
        for cb in list(self._listeners):
            cb(kind, run)

    def __getitem__(self, kind: str) -> RunState:
        return self.runs[kind]

    def active(self, *kinds: str) -> bool:
        return any(self.runs[k].active for k in (kinds or KINDS))


def memory_hint(kind: str, device: str) -> str:
    """What to do after a run ran out of memory. Inference moves to the CPU by itself when a GPU runs out
    (``engine/inference.py``), so a segmentation that still fails ran out of the computer's memory: the CPU is no
    remedy there. Only a fine-tune on a GPU is helped by the CPU."""
    if kind == FINETUNE and device != "cpu":
        return " Try again on the CPU (Options → device: cpu): slower, but it uses the computer's memory."
    if kind == FINETUNE:
        return " Close other programs, or fine-tune on fewer or smaller (cropped) cases."
    return (" Close other programs, or crop the volume to the region you need (Crop Volume module) and try again"
            + ("." if kind == QA else "; a GPU that runs out hands the run to the CPU by itself."))


def _failure(state: ProcessingState, kind: str, error: BaseException, device: str = "auto") -> None:
    if isinstance(error, Cancelled):
        state.set(kind, CANCELLED, "Cancelled; nothing was changed.")
    elif isinstance(error, WorkerError):
        hint = memory_hint(kind, device) if error.out_of_memory else ""
        state.set(kind, FAILED, f"{error}{hint}", out_of_memory=error.out_of_memory)
    else:
        state.set(kind, FAILED, str(error))


def _progress(state: ProcessingState, kind: str, records: list[dict[str, Any]]) -> None:
    for rec in records:
        total = int(rec.get("total") or 0)
        message = rec.get("message") or None
        if total or message:
            state.set(kind, RUNNING, message, done=int(rec.get("done") or 0) if total else None, total=total or None)


def with_notes(message: str, run: Any) -> str:
    """A finished run's message with the worker's notes (GPU fallback, resampled inputs), which must not be lost."""
    notes = run.notes
    return message + (" Note: " + "; ".join(notes) + "." if notes else "")


def card_of(model: dict[str, Any] | None) -> dict[str, Any] | None:
    return model["card"] if model and model.get("card") else None


# The MRI sequence a volume's name (or a model's channel name) says, most specific first: "T2 FLAIR" is FLAIR and
# "T1 post Gd" / "t1ce" is T1c. Names as BraTS, MSD and DICOM series descriptions write them.
SEQUENCE_PATTERNS = (
    ("FLAIR", r"flair"),
    ("T1c", r"\bt1 ?(c|ce|gd|gad|\+ ?c|post|contrast)\b|\bt1 .*\b(gd|gad|gado\w*|post ?contrast|contrast|post)\b"
            r"|\b(gd|gad|gado\w*|post ?contrast) .*\bt1\b|\bmprage .*\b(gd|gad|post ?contrast)\b"),
    ("T2", r"\bt2w?\b"),
    ("T1", r"\bt1w?\b|\bmprage\b|\bspgr\b"),
)


def sequence_of(name: str) -> str | None:
    """'FLAIR', 'T1c', 'T2', 'T1' from a volume or channel name, or None when the name says none of them."""
    text = " ".join(re.sub(r"[^a-z0-9+]+", " ", name.lower()).split())
    return next((seq for seq, pattern in SEQUENCE_PATTERNS if re.search(pattern, text)), None)


# ------------------------------------------------------------------------------------------------------- segment
class SegmentController:
    """Apply / Cancel and the uncertainty run: inputs from the parameter node, one run at a time."""

    def __init__(self, bridge: Any, state: ProcessingState, params: Any):
        self.bridge, self.state, self.params = bridge, state, params
        self.run: Any = None
        self.kind = SEGMENT
        self.result: Any = None  # the last finished run (its segmentation node, uncertainty overlay and table)
        self.importing: Any = None  # (the bridge's finish_steps, its run) while a result is imported tick by tick

    def channels(self, model: dict[str, Any] | None) -> list[str]:
        card = card_of(model)
        return list(card["preset"]["channels"]) if card else ["Input volume"]

    def inputs(self, model: dict[str, Any] | None) -> list[Any]:
        return [getattr(self.params, f"inputVolume{i}") for i in range(len(self.channels(model)))]

    def suggest_inputs(self, model: dict[str, Any] | None) -> list[str]:
        """For a model with several MRI sequences: put each volume whose name names one sequence (and is the only such
        volume) into that sequence's input, where the input is empty or holds a volume also picked for another input
        (Slicer's selectors all show the first volume loaded). A choice the user made that differs from the other
        inputs is never replaced. Returns what was assigned ("T1c ← case_t1ce"), empty when nothing changed."""
        channels = self.channels(model)
        if len(channels) < 2:
            return []
        scene = self.bridge.scene
        volumes = [n for n in (scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
                               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")))
                   if n is not None and not n.IsA("vtkMRMLLabelMapVolumeNode") and not n.GetHideFromEditors()]
        named: dict[str, list[Any]] = {}
        for volume in volumes:
            named.setdefault(sequence_of(volume.GetName() or ""), []).append(volume)
        current = self.inputs(model)
        assigned = []
        for i, channel in enumerate(channels):
            node, wanted = current[i], sequence_of(channel)
            shared = node is not None and any(node is other for j, other in enumerate(current) if j != i)
            if wanted is None or (node is not None and not shared):
                continue  # nothing to go by, or the user's own choice
            if node is not None and sequence_of(node.GetName() or "") == wanted:
                continue  # the shared volume belongs here: the other inputs give it up
            candidates = named.get(wanted, [])
            if len(candidates) == 1 and not any(candidates[0] is other for other in current):
                current[i] = candidates[0]
                setattr(self.params, f"inputVolume{i}", candidates[0])
                assigned.append(f"{channel} ← {candidates[0].GetName()}")
        if assigned and not self.state.active(SEGMENT, UNCERTAINTY):
            self.state.set(SEGMENT, IDLE, "Inputs picked by their names: " + ", ".join(assigned) + ". Check them.")
        return assigned

    def readiness(self, model: dict[str, Any] | None) -> tuple[bool, str, bool]:
        """(Apply enabled, tooltip, needs a click): a usable model and every input; a model whose card requires a
        region (hippocampus) asks for a click on volumes larger than 1.5× its field of view."""
        if self.state.active(SEGMENT, UNCERTAINTY):
            return True, "Cancel the running segmentation", False
        if not model or model.get("status") != "ok":
            return False, "Select a usable model", False
        if not all(self.inputs(model)):
            return False, "Select every input volume: " + ", ".join(self.channels(model)), False
        roi = card_of(model)["preset"].get("roi") or {}
        volume = self.params.inputVolume0
        if roi.get("required") and volume.GetImageData() is not None:
            extent = [d * s for d, s in zip(volume.GetImageData().GetDimensions(), volume.GetSpacing())]
            if max(e / s for e, s in zip(sorted(extent), sorted(roi["size_mm"]))) > 1.5:
                return False, "This model segments a region around a click: use Click to segment", True
        return True, "Segment the input volume(s)", False

    def frames(self, model: dict[str, Any] | None) -> tuple[bool, str]:
        """('All frames' can be checked, its tooltip): the first input shows a sequence (a cine series) and the model
        takes one input."""
        from .sequences import cine_of

        cine = cine_of(self.bridge.scene, self.params.inputVolume0)
        if cine is None:
            return False, "Segment every frame of a sequence (a cine series): pick a volume that shows one as the input"
        if len(self.channels(model)) != 1:
            return False, "Every frame of a sequence is segmented with one-input models only"
        return True, (f"Segment all {cine.count} frames of '{cine.sequence.GetName()}' into a new segmentation sequence "
                      "shown frame by frame, with a table of the segments' volumes per frame (unchecked: only the "
                      "frame shown)")

    def apply(self, model: dict[str, Any] | None, uncertainty: bool = False) -> None:
        """Apply when idle, Cancel when running (one button)."""
        if self.run is not None or self.importing is not None:
            self.cancel()
            return
        self.kind = UNCERTAINTY if uncertainty else SEGMENT
        ok, why, _ = self.readiness(model)
        if not ok:
            self.state.set(self.kind, FAILED, why)
            return
        self.state.set(self.kind, STARTING, "Starting the worker…")
        try:
            all_frames = bool(self.params.allFrames) and not uncertainty and self.frames(model)[0]
            self.run = self.bridge.start(self.inputs(model), model["path"], device=self.params.device,
                                         tta=bool(self.params.tta) or uncertainty,
                                         segmentation_node=self.params.outputSegmentation, uncertainty=uncertainty,
                                         all_frames=all_frames)
        except Exception as e:  # noqa: BLE001 - shown to the user; nothing was created
            self.run = None
            _failure(self.state, self.kind, e)

    def tick(self, now: float | None = None) -> Any:
        """Forward progress; when the worker has ended, import its result (all frames: one frame per tick, so that
        Slicer's event loop runs in between). Returns the segmentation when done."""
        if self.importing is None:
            run = self.run
            if run is None:
                return None
            _progress(self.state, self.kind, run.worker.poll())
            if run.worker.running:
                return None
            self.run = None
            self.state.set(self.kind, IMPORTING, "Importing the segments…")
            self.importing = (self.bridge.finish_steps(run), run)
        steps, run = self.importing
        try:
            done, total = next(steps)
        except StopIteration as finished:
            seg = finished.value
        except Exception as e:  # noqa: BLE001
            self.importing = None
            _failure(self.state, self.kind, e)
            return None
        else:
            self.state.set(self.kind, IMPORTING, f"Importing frame {done} of {total}…", done=done, total=total)
            return None
        self.importing = None
        self.params.outputSegmentation = seg
        if seg.GetDisplayNode():
            seg.GetDisplayNode().SetVisibility(True)
        if self.params.show3D:
            seg.CreateClosedSurfaceRepresentation()
        self.result = run
        n = seg.GetSegmentation().GetNumberOfSegments()
        message = f"Done: {n} segments in '{seg.GetName()}'."
        if run.frames:
            message = (f"Done: {len(run.frames)} frames segmented into a new segmentation sequence, shown frame by frame "
                       f"in '{seg.GetName()}'; the segments' volumes per frame are in the table "
                       f"'{run.volumes_table.GetName()}'.")
        if run.uncertainty_node is not None:
            message += " Uncertainty overlay: bright = the model is unsure; segments are listed most uncertain first."
        self.state.set(self.kind, DONE, with_notes(message, run))
        return seg

    def cancel(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            self.bridge.cancel(run)
            self.state.set(self.kind, CANCELLED, "Cancelled; nothing was changed.")
        if self.importing is not None:  # part-way through importing the frames: what was added goes again
            (steps, run), self.importing = self.importing, None
            steps.close()
            run.cleanup()
            self.state.set(self.kind, CANCELLED, "Cancelled; nothing was changed.")

    def reset(self) -> None:
        self.cancel()
        self.result = None


# ------------------------------------------------------------------------------------------------------- prompts
class PromptController:
    """Click to segment: a point (the model's field of view around it) or a box ROI. Reacts to the markups events
    Slicer sends while placing and moving control points; a burst of moves runs once (debounce); the next prompt
    cancels the run in flight; a moved prompt replaces its own earlier result."""

    POINT, ROI = "vtkMRMLMarkupsFiducialNode", "vtkMRMLMarkupsROINode"

    def __init__(self, scene: Any, interactive: Any, state: ProcessingState, params: Any,
                 model: Callable[[], dict[str, Any] | None]):
        self.scene, self.interactive, self.state, self.params, self.model = scene, interactive, state, params, model
        self.nodes: dict[str, Any] = {}
        self._observations: list[tuple[Any, int]] = []
        self.pending: tuple[Any, int] | None = None
        self.pending_since = 0.0
        self.region: tuple[Any, tuple[str, int]] | None = None
        self.regions: dict[tuple[str, int], Any] = {}
        self.placing: str | None = None
        self.on_placing_changed: Callable[[str | None], None] | None = None

    # placement ---------------------------------------------------------------------------------------------
    def node(self, cls: str) -> Any:
        node = self.nodes.get(cls)
        if node is None or self.scene.GetNodeByID(node.GetID()) is None:
            node = self.scene.AddNewNodeByClass(cls, "DSD clicks" if cls == self.POINT else "DSD region")
            node.CreateDefaultDisplayNodes()
            events = [(slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._on_defined),
                      (slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._on_moved)]
            if cls == self.ROI:  # the second corner of a box does not always fire a defined event (slicer-core 5.11)
                events.append((slicer.vtkMRMLMarkupsNode.PointModifiedEvent, self._on_roi_modified))
            for event, handler in events:
                self._observations.append((node, node.AddObserver(event, handler)))
            self.nodes[cls] = node
        return node

    def place(self, cls: str | None) -> None:
        """Start placing a point (``POINT``) or an ROI (``ROI``), or stop placing (None), through the scene's
        selection and interaction nodes (one at a time: choosing one unchecks the other)."""
        interaction = self.scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        selection = self.scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
        self.placing = cls
        if cls is not None:
            node = self.node(cls)
            if selection is not None:
                selection.SetReferenceActivePlaceNodeClassName(cls)
                selection.SetActivePlaceNodeID(node.GetID())
            if interaction is not None:
                interaction.SetPlaceModePersistence(0)
                interaction.SetCurrentInteractionMode(interaction.Place)
        elif interaction is not None:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
        if self.on_placing_changed:
            self.on_placing_changed(cls)

    # events ------------------------------------------------------------------------------------------------
    @staticmethod
    def roi_ready(roi: Any) -> bool:
        """An ROI is a region once it has a size on every axis and no corner is still a preview: while the second
        corner follows the mouse (a PositionPreview control point) the box already has a size, but is not placed."""
        statuses = [roi.GetNthControlPointPositionStatus(i) for i in range(roi.GetNumberOfControlPoints())]
        if any(st != roi.PositionDefined for st in statuses):
            return False
        if all(s > MIN_ROI_MM for s in roi.GetSize()):
            return True
        # the box may be updated from its corners after the event: judge by the defined control points themselves
        pts = []
        for i in range(roi.GetNumberOfControlPoints()):
            p = [0.0, 0.0, 0.0]
            roi.GetNthControlPointPositionWorld(i, p)
            pts.append(p)
        return len(pts) >= 2 and all(max(c) - min(c) > MIN_ROI_MM for c in zip(*pts))

    def _on_defined(self, caller: Any, event: Any = None) -> None:
        self.prompt_changed(caller, defined=True)

    def _on_roi_modified(self, caller: Any, event: Any = None) -> None:
        """While a box is being placed it is defined once both corners are (whichever event says so first): a
        preview corner following the mouse fires this event too, and :meth:`roi_ready` says no to it."""
        if self.placing == self.ROI and self.roi_ready(caller):
            self.prompt_changed(caller, defined=True)

    def _on_moved(self, caller: Any, event: Any = None) -> None:
        self.prompt_changed(caller, defined=False)

    def prompt_changed(self, node: Any, defined: bool, now: float | None = None) -> None:
        if not defined and not self.params.liveRerun:
            return
        if node.IsA(self.ROI):
            if not self.roi_ready(node):
                return  # the first corner of a box being drawn: wait for the second
            index = -1
        else:
            n = node.GetNumberOfControlPoints()
            active = node.GetDisplayNode().GetActiveControlPoint() if node.GetDisplayNode() else -1
            index = n - 1 if defined or active is None or active < 0 else active
        if defined and self.placing is not None:
            self.place(None)
        self.pending = (node, index)
        self.pending_since = time.monotonic() if now is None else now

    # runs --------------------------------------------------------------------------------------------------
    def tick(self, now: float | None = None) -> Any:
        """Start a pending prompt once it has been still for DEBOUNCE_S; finish a run that ended. Returns the
        segmentation when a region was pasted."""
        now = time.monotonic() if now is None else now
        if self.pending is not None and now - self.pending_since >= DEBOUNCE_S:
            self._start(*self.pending)
            self.pending = None
        if self.region is None:
            return None
        region, key = self.region
        _progress(self.state, PROMPT, region.run.worker.poll())
        if region.run.worker.running:
            return None
        self.region = None
        self.state.set(PROMPT, IMPORTING, "Pasting the region…")
        try:
            seg = self.interactive.finish(region, previous=self.regions.get(key))
        except Exception as e:  # noqa: BLE001
            _failure(self.state, PROMPT, e)
            return None
        self.regions[key] = region
        self.params.outputSegmentation = seg
        if seg.GetDisplayNode():
            seg.GetDisplayNode().SetVisibility(True)
        side = f" ({region.side})" if region.side else ""
        self.state.set(PROMPT, DONE, with_notes(f"Segmented region{side}: voxels {list(region.lo)} to "
                                                f"{list(region.hi)}.", region.run))
        return seg

    def _start(self, node: Any, index: int) -> None:
        model, volume = self.model(), self.params.inputVolume0
        if not model or model.get("status") != "ok" or volume is None:
            self.state.set(PROMPT, FAILED, "Select a usable model and the input volume first.")
            return
        key = (node.GetID(), index)
        if self.region is not None:  # the next prompt cancels the run in flight (only that one)
            self.interactive.cancel(self.region[0])
            self.region = None
        seg = self.params.outputSegmentation or (self.regions[key].segmentation_node if key in self.regions else None)
        if seg is None and self.regions:
            seg = next(iter(self.regions.values())).segmentation_node
        self.state.set(PROMPT, STARTING, "Segmenting the region…")
        card = card_of(model)
        n_inputs = len(card["preset"]["channels"]) if card else 1
        others = [getattr(self.params, f"inputVolume{i}") for i in range(1, n_inputs)]  # further sequences
        try:
            if index < 0:
                region = self.interactive.start_roi(volume, model["path"], node, seg, device=self.params.device,
                                                    others=others)
            else:
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, pos)
                region = self.interactive.start(volume, model["path"], pos, segmentation_node=seg,
                                                device=self.params.device, others=others)
        except Exception as e:  # noqa: BLE001 - e.g. a click outside the volume: say so, change nothing
            _failure(self.state, PROMPT, e)
            return
        self.region = (region, key)

    def cancel(self) -> None:
        self.pending = None
        if self.region is not None:
            self.interactive.cancel(self.region[0])
            self.region = None
            self.state.set(PROMPT, CANCELLED, "Cancelled; nothing was changed.")

    def reset(self) -> None:
        """Scene closing: stop what runs; the prompt nodes go with the scene."""
        self.cancel()
        for node, tag in self._observations:
            node.RemoveObserver(tag)
        self._observations.clear()
        self.nodes.clear()
        self.regions.clear()
        self.placing = None


# ------------------------------------------------------------------------------------------------------- QA
class QAController:
    """Compare (↔ Cancel) a segmentation with a reference in the worker; step through the worst boundary errors."""

    def __init__(self, scene: Any, state: ProcessingState, params: Any, qa_logic: Any = None, bridge: Any = None):
        self.scene, self.state, self.params = scene, state, params
        self.bridge = bridge  # its warm worker computes the comparison
        self.qa_logic = qa_logic  # made on first use
        self.run: Any = None  # the comparison running in the worker
        self.result: Any = None
        self.error_index = -1

    def compare(self) -> None:
        """Start the comparison when idle (:meth:`tick` brings the result), Cancel when one runs (one button)."""
        if self.run is not None:
            self.cancel()
            return
        seg, ref, volume = self.params.qaSegmentation, self.params.qaReference, self.params.qaVolume
        if seg is None or ref is None or seg is ref:
            raise InputError("Pick two different segmentations: the one to check and the reference.")
        if volume is None:
            raise InputError("Pick the volume the segmentations belong to.")
        tolerance = float(bounded(self.params, "qaToleranceMm"))
        if self.qa_logic is None:
            from .qa_logic import QALogic

            self.qa_logic = QALogic(self.scene, self.bridge)
        self.state.set(QA, STARTING, "Comparing in the background…")
        try:
            self.run = self.qa_logic.start_compare(seg, ref, volume, tolerance_mm=tolerance)
        except Exception as e:  # noqa: BLE001 - shown to the user; nothing was changed
            self.run = None
            _failure(self.state, QA, e)

    def tick(self, now: float | None = None) -> Any:
        """Forward progress; when the worker has ended, build the QA nodes. Returns the QAResult when done."""
        run = self.run
        if run is None:
            return None
        _progress(self.state, QA, run.worker.poll())
        if run.worker.running:
            return None
        self.run = None
        self.state.set(QA, IMPORTING, "Showing the comparison…")
        self.restore_display()  # a new comparison starts from how the user showed the segmentations
        try:
            self.result = self.qa_logic.finish_compare(run)
        except Exception as e:  # noqa: BLE001
            _failure(self.state, QA, e)
            return None
        self.error_index = -1
        self.state.set(QA, DONE, f"Yellow outline: {run.segmentation.GetName()}; cyan: {run.reference.GetName()}. "
                                 f"Surfaces: blue inside the reference, red outside (±{run.clamp_mm:g} mm). "
                                 f"{self.error_count} worst error point(s).")
        return self.result

    def cancel(self) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            self.qa_logic.cancel_compare(run)
            self.state.set(QA, CANCELLED, "Cancelled; nothing was changed.")

    def restore_display(self) -> bool:
        """Show the last compared segmentations as they were before Compare (fill, outline, colours); the QA table,
        surfaces and points stay. False when there is nothing to restore."""
        if self.result is None or not self.result.display_before or self.qa_logic is None:
            return False
        self.qa_logic.restore_display(self.result.display_before)
        self.result.display_before = {}
        return True

    @property
    def error_count(self) -> int:
        return self.result.markups.GetNumberOfControlPoints() if self.result is not None else 0

    def next_error(self) -> tuple[int, int, list[float], str] | None:
        """(index, count, RAS position, description) of the next worst error, cycling; None without errors."""
        n = self.error_count
        if n == 0:
            return None
        self.error_index = (self.error_index + 1) % n
        pos = [0.0, 0.0, 0.0]
        self.result.markups.GetNthControlPointPositionWorld(self.error_index, pos)
        return self.error_index, n, pos, self.result.markups.GetNthControlPointDescription(self.error_index)

    def reset(self) -> None:
        self.cancel()
        self.result = None
        self.error_index = -1


# ------------------------------------------------------------------------------------------------------- fine-tune
class FinetuneController:
    """Cases from the scene (or a folder), Fine-tune ↔ Stop, Resume, the live loss / Dice table, the new model."""

    def __init__(self, bridge: Any, state: ProcessingState, params: Any, work_root: Callable[[], Path]):
        self.bridge, self.state, self.params, self.work_root = bridge, state, params, work_root
        self.cases: list[tuple[str, str, str]] = []  # (volume id, segmentation id, frame: a cine's index value or "")
        self.worker: Any = None
        self.run: dict[str, str] | None = None  # base, data, output of the current or stopped fine-tune
        self.plot_table: Any = None
        self.plot_chart: Any = None
        self.started = 0.0
        self.epochs_at_start: int | None = None  # epochs the run had done when this worker started (for time left)
        self.result: dict[str, Any] | None = None  # the worker's "done" record: new model id and package
        self.mapping_lines: list[str] = []  # the label mapping of the last dataset built from the scene

    # cases -------------------------------------------------------------------------------------------------
    def add_case(self) -> None:
        """The picked volume and segmentation as a case; a volume that shows a sequence (a cine) adds the frame shown
        now, so that each corrected frame of a cine is its own case."""
        from .sequences import cine_of

        volume, seg = self.params.finetuneVolume, self.params.finetuneSegmentation
        if volume is None or seg is None:
            raise InputError("Pick a volume and its corrected segmentation first.")
        cine = cine_of(self.bridge.scene, volume)
        case = (volume.GetID(), seg.GetID(), cine.shown() if cine is not None else "")
        if case not in self.cases:
            self.cases.append(case)

    def scene_cases(self) -> list[tuple[Any, Any, str]]:
        """(volume, segmentation, frame) of each case, as the bridge builds the dataset from them."""
        return [(self.bridge.scene.GetNodeByID(v), self.bridge.scene.GetNodeByID(s), f) for v, s, f in self.cases]

    def remove_cases(self, rows: list[int]) -> None:
        for row in sorted(set(rows), reverse=True):
            if 0 <= row < len(self.cases):
                del self.cases[row]

    def case_rows(self, model: dict[str, Any] | None) -> list[tuple[str, str, str]]:
        """(volume, segmentation, label → segment mapping) per case, as the table shows them."""
        rows = []
        card = card_of(model)
        for volume, seg, frame in self.scene_cases():
            mapping = ""
            if card and seg is not None and volume is not None:
                preset = card["preset"]
                with self.bridge.at_frame(volume, frame):
                    found = self.bridge.match_segments(seg, preset)
                    extra = [s.GetName() for _, s in self.bridge.unmatched_segments(seg, preset)]
                mapping = "; ".join(f"{preset['labels'][str(v)]} → {m['segment']} ({m['by']})" for v, m in found.items())
                missing = [n for k, n in preset["labels"].items() if k != "0" and int(k) not in found]
                if missing:
                    mapping += ("; " if mapping else "") + "not annotated: " + ", ".join(missing)
                if extra:
                    mapping += ("; " if mapping else "") + "new label: " + ", ".join(extra)
            rows.append((self.bridge.case_name(volume, frame) if volume else "?", seg.GetName() if seg else "?",
                         mapping))
        return rows

    # runs --------------------------------------------------------------------------------------------------
    @property
    def can_resume(self) -> bool:
        return self.worker is None and (self.run is not None or self.stopped_on_disk() is not None)

    def stopped_on_disk(self) -> dict[str, Any] | None:
        """The newest fine-tune in the work folder that was stopped (or ended with Slicer) before it registered its
        model: a run folder with a checkpoint and no ``registered.json``. Resume continues it in a new Slicer session
        as in the one that started it."""
        from ..engine.finetune import REGISTERED

        try:
            folders = sorted((p for p in Path(self.work_root()).glob("*/run") if p.is_dir()), reverse=True)
        except OSError:
            return None
        for run in folders:
            if (run / "last.pt").is_file() and (run / "config.json").is_file() and not (run / REGISTERED).is_file():
                try:
                    config = json.loads((run / "config.json").read_text(encoding="utf-8"))
                    history = json.loads((run / "history.json").read_text(encoding="utf-8")) \
                        if (run / "history.json").is_file() else []
                except (OSError, ValueError):
                    continue
                return {"base": config.get("init_from"), "data": config.get("data"), "output": str(run),
                        "label_map": None, "epochs": config.get("epochs"), "history": history}
        return None

    @property
    def resume_description(self) -> str:
        """What Resume would continue (the Resume button's tooltip)."""
        if self.worker is not None:
            return "A fine-tune is running"
        run = self.run if self.run is not None else self.stopped_on_disk()
        if run is None:
            return "No stopped fine-tune to resume"
        where = Path(run["output"]).parent.name if run.get("output") else "?"
        try:
            where = time.strftime("%Y-%m-%d %H:%M", time.strptime(where, "%Y%m%d-%H%M%S"))
        except ValueError:
            pass
        done = len(run["history"]) if "history" in run else None
        base = Path(run["base"]).name if run.get("base") else "?"
        text = f"Resume the fine-tune of {base} started {where}"
        if done is not None and run.get("epochs"):
            text += f", stopped after epoch {done} of {run['epochs']}"
        return text + " (it keeps its own epochs, learning rate and DSD setting)"

    def toggle(self, model: dict[str, Any] | None) -> None:
        """The Fine-tune / Stop button: start a new fine-tune when idle, stop the running one otherwise."""
        if self.worker is not None:
            self.stop()
        else:
            self.start(model)

    def stop(self) -> None:
        """Stop the running fine-tune; the last finished epoch's checkpoint is kept for Resume."""
        if self.worker is None:
            return
        self.worker.cancel()
        self.state.set(FINETUNE, RUNNING, "Stopping… the last finished epoch is kept; Resume continues from it.")

    def start(self, model: dict[str, Any] | None, resume: bool = False) -> None:
        """Start a fine-tune (or resume the stopped one). Never stops a running one: that is :meth:`stop`."""
        if self.worker is not None:
            return  # already running (a second click, or Resume pressed while it runs): nothing to do
        try:
            if not model or model.get("status") != "ok":
                raise InputError("Select a usable base model in the Inputs section.")
            if resume and self.run is None:
                self.run = self.stopped_on_disk()  # stopped in an earlier Slicer session
                if self.run is None:
                    raise InputError("There is no stopped fine-tune to resume.")
                self.plot_table, self.plot_chart = self.bridge.training_plot(f"Fine-tune {Path(self.run['base']).name}")
                for record in self.run.get("history", []):
                    self.bridge.add_epoch(self.plot_table, record)
            # a resumed run keeps its own epochs, learning rate and terms, whatever the panel shows now
            epochs, lr = (None, None) if resume else (int(bounded(self.params, "finetuneEpochs")),
                                                      float(bounded(self.params, "finetuneLearningRate")))
            if not resume:
                work = self.work_root() / time.strftime("%Y%m%d-%H%M%S")
                folder = str(self.params.finetuneFolder or "").strip()
                label_map = None
                if folder and folder != ".":
                    data = folder
                else:
                    built = self.bridge.build_finetune_dataset(self.scene_cases(), card_of(model)["preset"],
                                                               work / "data")
                    data, label_map = built["folder"], built["label_map"]
                    self.mapping_lines = built["mapping"]
                self.run = {"base": model["path"], "data": str(data), "output": str(work / "run"),
                            "label_map": label_map}
                self.plot_table, self.plot_chart = self.bridge.training_plot(f"Fine-tune {model['id']}")
            self.state.set(FINETUNE, STARTING, "Preparing the cases…")
            self.worker = self.bridge.start_finetune(
                self.run["base"], self.run["data"], self.run["output"], epochs=epochs,
                lr=lr, dsd="dsd" if self.params.finetuneDSD else "plain",
                freeze_encoder=bool(self.params.finetuneFreezeEncoder), device=self.params.device,
                name=self.params.finetuneName or None, resume=resume, label_map=self.run.get("label_map"))
            self.started, self.epochs_at_start = time.monotonic(), None
            self.result = None
        except Exception as e:  # noqa: BLE001
            self.worker = None
            _failure(self.state, FINETUNE, e, self.params.device)

    def tick(self, now: float | None = None) -> dict[str, Any] | None:
        """Epoch records into the plot table, progress and time left; returns the result record when done."""
        worker = self.worker
        if worker is None:
            return None
        now = time.monotonic() if now is None else now
        for rec in worker.poll():
            if rec.get("stage") == "epoch":
                if self.plot_table is not None:
                    self.bridge.add_epoch(self.plot_table, rec["record"])
                done, total = int(rec["done"]), int(rec["total"])
                if self.epochs_at_start is None:  # a resumed run starts past epoch 0
                    self.epochs_at_start = done - 1
                per_epoch = (now - self.started) / max(done - self.epochs_at_start, 1)
                best = rec.get("best", -1)
                loss = rec["record"].get("loss/total", math.nan)
                self.state.set(FINETUNE, RUNNING, f"Epoch {done}/{total}, loss {loss:.4f}, best validation Dice "
                               f"{best:.3f}" if best >= 0 else f"Epoch {done}/{total}, loss {loss:.4f}", done, total)
                if total > done:
                    self.state.runs[FINETUNE].message += f", about {per_epoch * (total - done) / 60:.0f} min left"
            elif rec.get("stage") == "done":
                self.result = rec
            elif rec.get("message") and rec.get("stage") in ("log", "error"):
                self.state.set(FINETUNE, RUNNING, rec["message"])
        if worker.running:
            return None
        self.worker = None
        result = worker.wait()
        if result.ok and self.result:
            r = self.result
            self.run = None
            self.state.set(FINETUNE, DONE, f"New model {r['model_id']}: held-out Dice {r['before']['mean_dice']:.3f} "
                           f"(base) → {r['after']['mean_dice']:.3f}")
            return r
        if result.status == "cancelled":
            self.state.set(FINETUNE, CANCELLED, "Stopped. Resume continues from the last finished epoch.")
        else:
            hint = memory_hint(FINETUNE, self.params.device) if result.out_of_memory else ""
            self.state.set(FINETUNE, FAILED, f"Stopped: {result.message}{hint}", out_of_memory=result.out_of_memory)
        return None

    def shutdown(self) -> None:
        """Module closed: end a running fine-tune now (its last finished epoch stays resumable from its folder).
        Not the Stop button (:meth:`stop`), whose end the next tick reports. (Until session 11 this was a second
        ``stop`` that replaced the first: Stop then never reported "Stopped", the button stayed "Stop", and
        pressing it again started a new fine-tune instead of offering Resume.)"""
        if self.worker is not None:
            self.worker.cancel()
            self.worker.wait()
            self.worker = None

    def reset(self) -> None:
        """Scene closing: the cases and the plot nodes go with the scene; a running fine-tune goes on (its files
        are outside the scene) and can still be resumed."""
        self.cases.clear()
        self.plot_table = self.plot_chart = None


# ------------------------------------------------------------------------------------------------------- panel
@dataclass
class PanelController:
    """The four section controllers over one scene and one processing state; resets them when the scene closes."""

    scene: Any
    bridge: Any
    params: Any
    model: Callable[[], dict[str, Any] | None]
    work_root: Callable[[], Path]
    state: ProcessingState = field(default_factory=ProcessingState)

    def __post_init__(self) -> None:
        from .interactive import InteractiveLogic

        self.segment = SegmentController(self.bridge, self.state, self.params)
        self.prompt = PromptController(self.scene, InteractiveLogic(self.bridge), self.state, self.params, self.model)
        self.qa = QAController(self.scene, self.state, self.params, bridge=self.bridge)
        self.finetune = FinetuneController(self.bridge, self.state, self.params, self.work_root)
        if self.finetune.stopped_on_disk() is not None:
            self.state.set(FINETUNE, IDLE, f"{self.finetune.resume_description}: press Resume.")
        self._close_tag = self.scene.AddObserver(self.scene.StartCloseEvent, self._on_scene_close)

    def _on_scene_close(self, caller: Any = None, event: Any = None) -> None:
        self.segment.reset()
        self.prompt.reset()
        self.qa.reset()
        self.finetune.reset()

    def tick(self, now: float | None = None) -> dict[str, Any]:
        """One poll of every section (the widget's timer): what finished in this tick."""
        return {"segment": self.segment.tick(now), "prompt": self.prompt.tick(now), "finetune": self.finetune.tick(now),
                "qa": self.qa.tick(now)}

    # model files ------------------------------------------------------------------------------------------
    def import_model(self, zip_path: str | Path) -> Path:
        """A model package zip into the user's models (safe extraction, every sha256 checked, nothing replaced);
        returns the new package folder."""
        from ..engine.finetune import import_zip

        if not str(zip_path).strip():
            raise InputError("Choose a model package (.zip) to import.")
        return import_zip(zip_path)

    def export_model(self, model: dict[str, Any] | None, zip_path: str | Path) -> Path:
        """The selected model as a package zip (the file must not exist; the package is verified first)."""
        from ..engine.finetune import export_zip

        if not model or model.get("status") != "ok":
            raise InputError("Select a usable model to export.")
        if not str(zip_path).strip():
            raise InputError("Choose where to write the model package (.zip).")
        return export_zip(model["path"], zip_path)

    def shutdown(self) -> None:
        """Module closed: nothing is left running (a stopped fine-tune can be resumed later)."""
        self._on_scene_close()
        self.finetune.shutdown()
        self.scene.RemoveObserver(self._close_tag)
        self.bridge.shutdown()
