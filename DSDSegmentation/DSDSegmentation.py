"""DSDSegmentation Slicer module: the widget room (thin Qt layer bound to a parameter node).

Everything else lives in ``DSDSegmentationLib``: the MRML bridge (``logic.py``, Qt-free), the worker client
(``process.py``) and the engine that the background ``dsdseg`` worker runs with Slicer's own Python.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
MAX_INPUTS = 4


def resourcePath(relative: str) -> str:
    """``Resources/`` is next to the module in a build/install tree and one level up in the source tree."""
    for base in (os.path.join(MODULE_DIR, "Resources"), os.path.join(MODULE_DIR, "..", "Resources")):
        path = os.path.join(base, relative)
        if os.path.exists(path):
            return os.path.normpath(path)
    return os.path.join(MODULE_DIR, "Resources", relative)


class DSDSegmentation(ScriptedLoadableModule):
    """Module registration: title, category and credits shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DSDSegmentation")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DSDSegmentation developers"]
        self.parent.helpText = _(
            "Segment hippocampus, cardiac and brain-tumour MRI with dual self-distillation (DSD) U-shaped networks. "
            "Pick the input volume(s) and a model, then Apply. Inference runs in a background process on the GPU "
            "or the CPU; Slicer stays responsive and Cancel stops it."
        )
        self.parent.acknowledgementText = _(
            "DSD: Banerjee, Summerfield, Dong, Glide-Hurst, IEEE TBME 2025 (arXiv 2306.03271). Networks, losses and "
            "transforms from MONAI."
        )
        slicer.app.connect("startupCompleted()", registerTerminology)


def registerTerminology() -> None:
    """Load the custom terminology context that holds every segment type our models produce (SNOMED CT / NCIt
    codes, recommended colours), so Slicer's terminology selector and DICOM SEG export know them."""
    try:
        logic = slicer.modules.terminologies.logic()
        path = resourcePath("Terminology/DSDSegmentation.term.json")
        if not logic.LoadTerminologyFromFile(path):
            logging.warning(f"DSDSegmentation: could not load the terminology context {path}")
    except AttributeError:  # Terminologies module not loaded (e.g. a reduced application)
        logging.warning("DSDSegmentation: Terminologies module unavailable; segments keep their coded tags only")


@parameterNodeWrapper
class DSDSegmentationParameterNode:
    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "cpu"])] = "auto"
    tta: bool = False
    show3D: bool = True


class DSDSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Panel: model and inputs from the parameter node, Apply/Cancel, progress from the worker's JSON lines."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[DSDSegmentationLogic] = None
        self._parameterNode: Optional[DSDSegmentationParameterNode] = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._models: list[dict] = []
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.connect("timeout()", self._poll)
        self._qa = None
        self._qaError = -1
        self._interactiveLogic = None
        self._prompts: dict = {}
        self._regions: dict = {}
        self._region = None
        self._pendingPrompt = None
        self._debounce = qt.QTimer()
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(300)
        self._debounce.connect("timeout()", self._runPrompt)
        self._regionTimer = qt.QTimer()
        self._regionTimer.setInterval(50)
        self._regionTimer.connect("timeout()", self._pollRegion)
        self._pairs: list[tuple[str, str]] = []
        self._finetune = None
        self._finetuneRun: Optional[dict] = None
        self._finetuneResult: Optional[dict] = None
        self._plotTable = None
        self._finetuneStarted = 0.0
        self._finetuneTimer = qt.QTimer()
        self._finetuneTimer.setInterval(500)
        self._finetuneTimer.connect("timeout()", self._pollFinetune)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/DSDSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DSDSegmentationLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.placePointButton.connect("toggled(bool)", self.onPlacePoint)
        self.ui.placeRoiButton.connect("toggled(bool)", self.onPlaceRoi)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.nextErrorButton.connect("clicked(bool)", self.onNextError)
        self.ui.uncertaintyButton.connect("clicked(bool)", self.onUncertainty)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.finetuneButton.connect("clicked(bool)", self.onFinetuneButton)
        self.ui.resumeButton.connect("clicked(bool)", self.onResumeButton)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.cancelRun()
        if self._region is not None:
            self._interactive().cancel(self._region[0])
            self._region = None
        if self._finetune is not None:
            self._finetune.cancel()  # never left running after Slicer closes; Resume can continue it later
        if self.logic:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApply)

    def onSceneStartClose(self, caller, event) -> None:
        self.cancelRun()
        if self._region is not None:
            self._regionTimer.stop()
            self._interactive().cancel(self._region[0])
            self._region = None
        self._pendingPrompt = None
        self._prompts.clear()  # their nodes go with the scene
        self._regions.clear()
        self._qa = None
        self.ui.nextErrorButton.enabled = False
        self._pairs.clear()
        self._updatePairsTable()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume0:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume0 = first

    def setParameterNode(self, node: Optional[DSDSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApply)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateApply)
            index = self.ui.modelComboBox.findData(self._parameterNode.modelPath)
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
            self.onModelChanged()

    # ----------------------------------------------------------------------------------------------- models
    def refreshModels(self) -> None:
        from DSDSegmentationLib.engine.cards import list_models

        self._models = list_models()
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for m in self._models:
            label = m["title"] + (" (user)" if m["source"] == "user" else "")
            if m["status"] != "ok":
                label += f" — unavailable: {m['status']}"
            combo.addItem(label, m["path"])
        combo.blockSignals(False)
        if not self._models:
            self.ui.statusLabel.text = _("No model found. Built-in models live in Resources/Models; user models in ") + \
                str(__import__("DSDSegmentationLib.engine.cards", fromlist=["x"]).user_models_dir())

    def currentModel(self) -> Optional[dict]:
        i = self.ui.modelComboBox.currentIndex
        return self._models[i] if 0 <= i < len(self._models) else None

    def onModelChanged(self, *_args) -> None:
        model = self.currentModel()
        channels = model["card"]["preset"]["channels"] if model and model["card"] else ["Input volume"]
        for i in range(MAX_INPUTS):
            visible = i < len(channels)
            getattr(self.ui, f"inputLabel{i}").setVisible(visible)
            getattr(self.ui, f"inputVolumeSelector{i}").setVisible(visible)
            if visible:
                getattr(self.ui, f"inputLabel{i}").text = channels[i] + ":"
        if self._parameterNode and model:
            self._parameterNode.modelPath = model["path"]
        self._updateApply()

    def _inputs(self) -> list:
        model = self.currentModel()
        n = len(model["card"]["preset"]["channels"]) if model and model["card"] else 1
        return [getattr(self._parameterNode, f"inputVolume{i}") for i in range(n)]

    def _updateApply(self, caller=None, event=None) -> None:
        if self._run is not None:
            return
        model = self.currentModel()
        ready = bool(self._parameterNode and model and model["status"] == "ok" and all(self._inputs()))
        needs_prompt = False
        roi = (model["card"]["preset"].get("roi") or {}) if model and model["card"] else {}
        volume = self._parameterNode.inputVolume0 if self._parameterNode else None
        if roi.get("required") and volume is not None and volume.GetImageData() is not None:
            # a volume no larger than the model's field of view is already a region; a whole head is not
            extent = [d * sp for d, sp in zip(volume.GetImageData().GetDimensions(), volume.GetSpacing())]
            needs_prompt = max(e / s for e, s in zip(sorted(extent), sorted(roi["size_mm"]))) > 1.5
        self.ui.applyButton.enabled = ready and not needs_prompt
        if needs_prompt:
            self.ui.applyButton.toolTip = _("This model segments a region around a click: use Click to segment")
            self.ui.interactiveCollapsibleButton.collapsed = False
        else:
            self.ui.applyButton.toolTip = _("Segment the input volume(s)") if ready else _("Select a usable model and every input volume")

    # ---------------------------------------------------------------------------------------------- running
    def onApplyButton(self) -> None:
        if self._run is not None:
            self.cancelRun()
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            self.ui.environmentLabel.text = self.logic.environmentInfo()
            p = self._parameterNode
            self._run = self.logic.bridge().start(self._inputs(), p.modelPath, device=p.device, tta=p.tta,
                                                  segmentation_node=p.outputSegmentation)
            self.ui.applyButton.text = _("Cancel")
            self.ui.progressBar.visible = True
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Starting the worker…")
            self._timer.start()

    def _poll(self) -> None:
        run = self._run
        if run is None:
            self._timer.stop()
            return
        for rec in run.worker.poll():
            if rec.get("total"):
                self.ui.progressBar.maximum = int(rec["total"])
                self.ui.progressBar.value = int(rec["done"])
            if rec.get("message"):
                self.ui.statusLabel.text = rec["message"]
        if run.worker.running:
            return
        self._timer.stop()
        self._run = None
        self._resetButton()
        try:
            seg = self.logic.bridge().finish(run)
        except Exception as e:  # noqa: BLE001 - shown to the user, nothing was created
            self.ui.statusLabel.text = str(e)
            slicer.util.errorDisplay(str(e))
            return
        self._parameterNode.outputSegmentation = seg
        seg.GetDisplayNode().SetVisibility(True)
        if self._parameterNode.show3D:
            seg.CreateClosedSurfaceRepresentation()
        slicer.util.setSliceViewerLayers(background=run.inputs[0], fit=True)
        if run.uncertainty_node is not None:
            slicer.util.setSliceViewerLayers(foreground=run.uncertainty_node, foregroundOpacity=0.5)
            self.ui.qaTableView.setMRMLTableNode(run.uncertainty_table)
            self.ui.qaStatusLabel.text = _("Uncertainty overlay: bright = the model is unsure. Segments are listed "
                                           "from the most to the least uncertain; look there first.")
        self.ui.statusLabel.text = _("Done: {n} segments in '{name}'.").format(
            n=seg.GetSegmentation().GetNumberOfSegments(), name=seg.GetName())

    def cancelRun(self) -> None:
        if self._run is not None:
            self._timer.stop()
            self.logic.bridge().cancel(self._run)
            self._run = None
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            self._resetButton()

    # ---------------------------------------------------------------------------------------------- prompts
    def _interactive(self):
        if self._interactiveLogic is None:
            from DSDSegmentationLib.bridge.interactive import InteractiveLogic

            self._interactiveLogic = InteractiveLogic(self.logic.bridge())
        return self._interactiveLogic

    def _promptNode(self, cls: str, name: str):
        node = self._prompts.get(cls)
        if node is None or slicer.mrmlScene.GetNodeByID(node.GetID()) is None:
            node = slicer.mrmlScene.AddNewNodeByClass(cls, name)
            node.CreateDefaultDisplayNodes()
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._onPromptDefined)
            self.addObserver(node, slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent, self._onPromptMoved)
            self._prompts[cls] = node
        return node

    def _place(self, cls: str, name: str, checked: bool) -> None:
        interaction = slicer.app.applicationLogic().GetInteractionNode()
        if not checked:
            interaction.SetCurrentInteractionMode(interaction.ViewTransform)
            return
        if not self.logic.ensureDependencies():
            return
        node = self._promptNode(cls, name)
        selection = slicer.app.applicationLogic().GetSelectionNode()
        selection.SetReferenceActivePlaceNodeClassName(cls)
        selection.SetActivePlaceNodeID(node.GetID())
        interaction.SetPlaceModePersistence(0)
        interaction.SetCurrentInteractionMode(interaction.Place)

    def onPlacePoint(self, checked: bool) -> None:
        self.ui.placeRoiButton.checked = False
        self._place("vtkMRMLMarkupsFiducialNode", "DSD clicks", checked)

    def onPlaceRoi(self, checked: bool) -> None:
        self.ui.placePointButton.checked = False
        self._place("vtkMRMLMarkupsROINode", "DSD region", checked)

    def _onPromptDefined(self, caller, event) -> None:
        self._onPromptChanged(caller, defined=True)

    def _onPromptMoved(self, caller, event) -> None:
        self._onPromptChanged(caller, defined=False)

    def _onPromptChanged(self, caller, defined: bool) -> None:
        if not defined and not self.ui.liveCheckBox.checked:
            return
        self.ui.placePointButton.checked = False
        self.ui.placeRoiButton.checked = False
        if caller.IsA("vtkMRMLMarkupsROINode"):
            self._pendingPrompt = (caller, -1)
        else:
            n = caller.GetNumberOfControlPoints()
            index = n - 1 if defined else caller.GetDisplayNode().GetActiveControlPoint()
            self._pendingPrompt = (caller, index if index is not None and index >= 0 else n - 1)
        self._debounce.start()  # a burst of moves runs once, 300 ms after the last

    def _runPrompt(self) -> None:
        if self._pendingPrompt is None:
            return
        node, index = self._pendingPrompt
        self._pendingPrompt = None
        model, volume = self.currentModel(), self._parameterNode.inputVolume0 if self._parameterNode else None
        if not model or model["status"] != "ok" or volume is None:
            self.ui.interactiveStatusLabel.text = _("Select a usable model and the input volume first.")
            return
        key = (node.GetID(), index)
        if self._region is not None:  # the next prompt cancels the run in flight
            self._interactive().cancel(self._region[0])
            self._region = None
        try:
            seg = self._parameterNode.outputSegmentation or (self._regions[key].segmentation_node if key in self._regions else None)
            if seg is None and self._regions:
                seg = next(iter(self._regions.values())).segmentation_node
            if index < 0:
                region = self._interactive().start_roi(volume, model["path"], node, seg, device=self._parameterNode.device)
            else:
                pos = [0.0, 0.0, 0.0]
                node.GetNthControlPointPositionWorld(index, pos)
                region = self._interactive().start(volume, model["path"], pos, segmentation_node=seg,
                                                   device=self._parameterNode.device)
        except Exception as e:  # noqa: BLE001 - e.g. a click outside the volume: say so, change nothing
            self.ui.interactiveStatusLabel.text = str(e)
            return
        self._region = (region, key)
        self.ui.interactiveStatusLabel.text = _("Segmenting the region…")
        self._regionTimer.start()

    def _pollRegion(self) -> None:
        if self._region is None:
            self._regionTimer.stop()
            return
        region, key = self._region
        region.run.worker.poll()
        if region.run.worker.running:
            return
        self._regionTimer.stop()
        self._region = None
        try:
            seg = self._interactive().finish(region, previous=self._regions.get(key))
        except Exception as e:  # noqa: BLE001
            self.ui.interactiveStatusLabel.text = str(e)
            return
        self._regions[key] = region
        self._parameterNode.outputSegmentation = seg
        seg.GetDisplayNode().SetVisibility(True)
        side = f" ({region.side})" if region.side else ""
        self.ui.interactiveStatusLabel.text = _("Segmented region{side}: voxels {lo} to {hi}.").format(
            side=side, lo=list(region.lo), hi=list(region.hi))

    # ---------------------------------------------------------------------------------------------- QA
    def onCompare(self) -> None:
        from DSDSegmentationLib.bridge.qa_logic import QALogic

        with slicer.util.tryWithErrorDisplay(_("Could not compare the segmentations."), waitCursor=True):
            seg, ref = self.ui.qaSegmentationSelector.currentNode(), self.ui.qaReferenceSelector.currentNode()
            volume = self.ui.qaVolumeSelector.currentNode()
            if seg is None or ref is None or seg is ref:
                raise ValueError(_("Pick two different segmentations: the one to check and the reference."))
            self._qa = QALogic(slicer.mrmlScene).compare(seg, ref, volume, tolerance_mm=self.ui.qaToleranceSpinBox.value)
            self.ui.qaTableView.setMRMLTableNode(self._qa.table)
            self._qaError = -1
            self.ui.nextErrorButton.enabled = self._qa.markups.GetNumberOfControlPoints() > 0
            legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(next(iter(self._qa.models.values())))
            if legend:
                legend.SetTitleText("mm")
            self.ui.qaStatusLabel.text = _("Yellow outline: {s}; cyan: {r}. Surfaces: blue inside the reference, red outside "
                                           "(±5 mm). {n} worst error point(s).").format(
                s=seg.GetName(), r=ref.GetName(), n=self._qa.markups.GetNumberOfControlPoints())
            self.onNextError()

    def onNextError(self) -> None:
        if not self._qa:
            return
        n = self._qa.markups.GetNumberOfControlPoints()
        if n == 0:
            return
        self._qaError = (self._qaError + 1) % n
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(self._qa.markups.GetID(), self._qaError, True)
        self.ui.qaStatusLabel.text = _("Error {i}/{n}: {d}").format(
            i=self._qaError + 1, n=n, d=self._qa.markups.GetNthControlPointDescription(self._qaError))

    def onUncertainty(self) -> None:
        if self._run is not None:
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start the segmentation."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            p = self._parameterNode
            self._run = self.logic.bridge().start(self._inputs(), p.modelPath, device=p.device, tta=True,
                                                  segmentation_node=p.outputSegmentation, uncertainty=True)
            self.ui.applyButton.text = _("Cancel")
            self.ui.progressBar.visible = True
            self.ui.statusLabel.text = _("Segmenting with flip TTA and an uncertainty map…")
            self._timer.start()

    # ---------------------------------------------------------------------------------------------- fine-tune
    def onAddPair(self) -> None:
        volume = self.ui.finetuneVolumeSelector.currentNode()
        seg = self.ui.finetuneSegmentationSelector.currentNode()
        if volume is None or seg is None:
            slicer.util.errorDisplay(_("Pick a volume and its corrected segmentation first."))
            return
        if any(v == volume.GetID() and s == seg.GetID() for v, s in self._pairs):
            return
        self._pairs.append((volume.GetID(), seg.GetID()))
        self._updatePairsTable()

    def onRemovePair(self) -> None:
        rows = sorted({i.row() for i in self.ui.pairsTable.selectedIndexes()}, reverse=True)
        for row in rows:
            del self._pairs[row]
        self._updatePairsTable()

    def _updatePairsTable(self) -> None:
        """One row per case: volume, segmentation, and how each model label maps to a segment."""
        table = self.ui.pairsTable
        table.setHorizontalHeaderLabels([_("Volume"), _("Segmentation"), _("Label → segment")])
        table.setRowCount(len(self._pairs))
        model = self.currentModel()
        for row, (vid, sid) in enumerate(self._pairs):
            volume, seg = slicer.mrmlScene.GetNodeByID(vid), slicer.mrmlScene.GetNodeByID(sid)
            mapping = ""
            if model and model["card"] and seg:
                preset = model["card"]["preset"]
                found = self.logic.bridge().match_segments(seg, preset)
                mapping = "; ".join(f"{preset['labels'][str(v)]} → {m['segment']} ({m['by']})" for v, m in found.items())
                missing = [n for k, n in preset["labels"].items() if k != "0" and int(k) not in found]
                if missing:
                    mapping += ("; " if mapping else "") + _("missing: ") + ", ".join(missing)
            for col, text in enumerate((volume.GetName() if volume else "?", seg.GetName() if seg else "?", mapping)):
                table.setItem(row, col, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()

    def onFinetuneButton(self) -> None:
        if self._finetune is not None:  # Stop: the last finished epoch's checkpoint is kept
            self._finetune.cancel()
            self.ui.finetuneStatusLabel.text = _("Stopping… the last finished epoch is kept; Resume continues from it.")
            return
        self._startFinetune(resume=False)

    def onResumeButton(self) -> None:
        if self._finetune is None and self._finetuneRun:
            self._startFinetune(resume=True)

    def _startFinetune(self, resume: bool) -> None:
        import time as _time

        from DSDSegmentationLib.engine.cards import user_models_dir

        with slicer.util.tryWithErrorDisplay(_("Could not start fine-tuning."), waitCursor=True):
            model = self.currentModel()
            if not model or model["status"] != "ok":
                raise ValueError(_("Select a usable base model in the Inputs section."))
            if not self.logic.ensureDependencies():
                return
            bridge = self.logic.bridge()
            if not resume:
                work = user_models_dir().parent / "finetune" / _time.strftime("%Y%m%d-%H%M%S")
                folder = self.ui.finetuneFolderEdit.currentPath
                if folder:
                    data = folder
                else:
                    pairs = [(slicer.mrmlScene.GetNodeByID(v), slicer.mrmlScene.GetNodeByID(s)) for v, s in self._pairs]
                    data = bridge.build_finetune_dataset(pairs, model["card"]["preset"], work / "data")["folder"]
                self._finetuneRun = {"base": model["path"], "data": data, "output": str(work / "run")}
                self._plotTable, chart = bridge.training_plot(f"Fine-tune {model['id']}")
                view = self.ui.plotWidget.mrmlPlotViewNode()
                if view is None:
                    view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "DSD fine-tune plot view")
                    self.ui.plotWidget.setMRMLPlotViewNode(view)
                view.SetPlotChartNodeID(chart.GetID())
            run = self._finetuneRun
            self._finetune = bridge.start_finetune(
                run["base"], run["data"], run["output"], epochs=self.ui.epochsSpinBox.value,
                lr=self.ui.lrSpinBox.value, dsd="dsd" if self.ui.dsdCheckBox.checked else "plain",
                freeze_encoder=self.ui.freezeEncoderCheckBox.checked, device=self._parameterNode.device,
                name=self.ui.modelNameEdit.text or None, resume=resume)
            self._finetuneStarted = _time.time()
            self._finetuneResult = None
            self.ui.finetuneButton.text = _("Stop")
            self.ui.resumeButton.enabled = False
            self.ui.finetuneStatusLabel.text = _("Preparing the cases…")
            self._finetuneTimer.start()

    def _pollFinetune(self) -> None:
        import time as _time

        worker = self._finetune
        if worker is None:
            self._finetuneTimer.stop()
            return
        for rec in worker.poll():
            if rec.get("stage") == "epoch":
                self.logic.bridge().add_epoch(self._plotTable, rec["record"])
                done, total = int(rec["done"]), int(rec["total"])
                self.ui.finetuneProgressBar.maximum = total
                self.ui.finetuneProgressBar.value = done
                per_epoch = (_time.time() - self._finetuneStarted) / max(done, 1)
                best = rec.get("best", -1)
                self.ui.finetuneStatusLabel.text = _("Epoch {d}/{t}, loss {l:.4f}, best validation Dice {b}, about {m:.0f} min left").format(
                    d=done, t=total, l=rec["record"].get("loss/total", float("nan")),
                    b=f"{best:.3f}" if best >= 0 else "–", m=per_epoch * (total - done) / 60)
            elif rec.get("stage") == "done":
                self._finetuneResult = rec
            elif rec.get("message") and rec.get("stage") in ("log", "error"):
                self.ui.finetuneStatusLabel.text = rec["message"]
        if worker.running:
            return
        self._finetuneTimer.stop()
        self._finetune = None
        self.ui.finetuneButton.text = _("Fine-tune")
        result = worker.wait()
        if result.ok and self._finetuneResult:
            r = self._finetuneResult
            self.refreshModels()
            index = self.ui.modelComboBox.findData(r["package"])
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
            self.ui.finetuneStatusLabel.text = _("New model {id}: held-out Dice {b:.3f} (base) → {a:.3f}").format(
                id=r["model_id"], b=r["before"]["mean_dice"], a=r["after"]["mean_dice"])
            self._finetuneRun = None
        else:
            self.ui.resumeButton.enabled = bool(self._finetuneRun)
            self.ui.finetuneStatusLabel.text = _("Stopped: {m}").format(m=result.message) if result.status != "cancelled" \
                else _("Stopped. Resume continues from the last finished epoch.")

    def _resetButton(self) -> None:
        self.ui.applyButton.text = _("Apply")
        self.ui.progressBar.visible = False
        self._updateApply()


class DSDSegmentationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side facade: parameter node, dependencies, and the Qt-free MRML bridge that does the work."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._bridge = None

    def getParameterNode(self):
        return DSDSegmentationParameterNode(super().getParameterNode())

    def bridge(self):
        if self._bridge is None:
            if MODULE_DIR not in sys.path:
                sys.path.insert(0, MODULE_DIR)
            from DSDSegmentationLib.bridge.logic import SegmentationBridge

            python = shutil.which("PythonSlicer") or sys.executable
            env = {"PYTHONPATH": os.pathsep.join([MODULE_DIR, os.environ.get("PYTHONPATH", "")])}
            self._bridge = SegmentationBridge(slicer.mrmlScene, python=python, env=env)
        return self._bridge

    def shutdown(self) -> None:
        if self._bridge is not None:
            self._bridge.shutdown()

    def requirements(self) -> list[str]:
        with open(resourcePath("requirements.txt"), encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.startswith("#")]

    def ensureDependencies(self) -> bool:
        """torch through PyTorch Utils, the rest through pip_ensure (5.12+) or pip_install (5.10), with consent.
        Slicer's own numpy, SimpleITK, vtk and requests are never touched."""
        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(_("DSDSegmentation needs the PyTorch extension. Install 'PyTorch' from the "
                                       "Extensions Manager and restart Slicer."))
            return False
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=">=2.4") is None:
                return False
        reqs = self.requirements()
        if hasattr(slicer, "packaging"):
            slicer.packaging.pip_ensure(reqs, requester="DSDSegmentation")
        else:
            import importlib.metadata as md

            missing = []
            for r in reqs:
                name = r.split("=")[0].split(">")[0].split("<")[0].strip()
                try:
                    md.version(name)
                except md.PackageNotFoundError:
                    missing.append(r)
            if missing:
                if not slicer.util.confirmOkCancelDisplay(_("DSDSegmentation will install: ") + ", ".join(missing)):
                    return False
                slicer.util.pip_install(missing)
        return True

    def environmentInfo(self) -> str:
        import torch

        cuda = torch.version.cuda or "none (CPU build)"
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        return f"torch {torch.__version__}, CUDA build {cuda}, device {device}"


class DSDSegmentationTest(ScriptedLoadableModuleTest):
    """Self-test in a real Slicer (``Testing/Slicer/run_selftest.py``): the model registry, then the bundled
    hippocampus model on a bundled sample case through the panel's Logic (background worker, import, terminology),
    checked against the case's manual label."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        self.setUp()
        self.test_models_listed()
        self.setUp()
        self.test_segment_with_builtin_model()
        self.setUp()
        self.test_click_and_qa()

    def test_models_listed(self) -> None:
        if MODULE_DIR not in sys.path:
            sys.path.insert(0, MODULE_DIR)
        from DSDSegmentationLib.engine.cards import list_models

        models = list_models()
        self.delayDisplay(f"{len(models)} model(s): " + ", ".join(f"{m['id']} ({m['status']})" for m in models))

    def test_segment_with_builtin_model(self) -> None:
        """The bundled hippocampus model on the bundled sample case: segments, names, terminology, Dice."""
        import numpy as np

        logic = DSDSegmentationLogic()
        self.assertTrue(logic.ensureDependencies())  # before anything below imports torch or MONAI
        from DSDSegmentationLib.bridge.demo import default_model, default_sample
        from DSDSegmentationLib.engine.cards import verify_package
        from DSDSegmentationLib.engine.data import list_cases
        from DSDSegmentationLib.engine.terminology import tag_string

        card = verify_package(default_model())
        case = list_cases(default_sample())[0]
        volume = slicer.util.loadVolume(case.images[0])
        reference = slicer.util.loadLabelVolume(case.label)
        try:
            seg = logic.bridge().segment([volume], str(default_model()), device="cpu")
        finally:
            logic.shutdown()
        labels = card["preset"]["labels"]
        segmentation = seg.GetSegmentation()
        ref = slicer.util.arrayFromVolume(reference)
        for value, name in labels.items():
            if value == "0":
                continue
            sid = segmentation.GetSegmentIdBySegmentName(name)
            self.assertTrue(sid, f"segment '{name}' missing")
            self.assertEqual(get_segment_terminology(segmentation.GetSegment(sid)), tag_string(card["preset"]["terminology"][value]))
            pred = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, volume) > 0
            truth = ref == int(value)
            dice = 2 * np.logical_and(pred, truth).sum() / max(pred.sum() + truth.sum(), 1)
            self.delayDisplay(f"{name}: Dice {dice:.3f}")
            self.assertGreater(dice, 0.75)
        self.delayDisplay("Segmentation test passed")

    def test_click_and_qa(self) -> None:
        """A click on the bundled sample's hippocampus segments the region, then QA compares it with the manual
        segmentation (table, distance surfaces, worst-error points)."""
        import numpy as np

        logic = DSDSegmentationLogic()
        self.assertTrue(logic.ensureDependencies())
        from DSDSegmentationLib.bridge.demo import default_model, default_sample
        from DSDSegmentationLib.engine.cards import read_model_card
        from DSDSegmentationLib.engine.data import list_cases
        from DSDSegmentationLib.bridge.interactive import InteractiveLogic
        from DSDSegmentationLib.bridge.qa_logic import QALogic

        case = list_cases(default_sample())[0]
        volume = slicer.util.loadVolume(case.images[0])
        label = slicer.util.loadLabelVolume(case.label)
        ijk = np.argwhere(slicer.util.arrayFromVolume(label) > 0).mean(0)[::-1]  # KJI -> IJK
        m = vtk.vtkMatrix4x4()
        volume.GetIJKToRASMatrix(m)
        click = list(m.MultiplyPoint([*ijk, 1.0])[:3])
        try:
            seg, region = InteractiveLogic(logic.bridge()).segment_at(volume, default_model(), click, device="cpu")
        finally:
            logic.shutdown()
        names = sorted(seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments()))
        self.assertEqual(len(names), 2)
        self.assertIsNone(region.side, "a crop around one hippocampus has no midline: no side in the names")
        preset = read_model_card(default_model())["preset"]
        reference = logic.bridge().import_labelmap(case.label, volume, preset, show_3d=False)
        result = QALogic(slicer.mrmlScene).compare(seg, reference, volume)
        self.assertEqual(result.table.GetNumberOfRows(), 2)
        self.assertEqual(len(result.models), 2)
        for name, metrics in result.metrics.items():
            self.delayDisplay(f"{name}: Dice {metrics['dice']:.3f}, HD95 {metrics['hd95']:.2f} mm")
            self.assertGreater(metrics["dice"], 0.7)
        self.delayDisplay("Click and QA test passed")
