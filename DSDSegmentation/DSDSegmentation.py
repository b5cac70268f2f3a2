"""DSDSegmentation Slicer module: the widget room. Binding only: widgets ↔ parameter node ↔ controllers.

Every decision lives in Qt-free controllers (``DSDSegmentationLib/bridge/controllers.py``), tested headless on a
real MRML scene; the MRML bridge (``bridge/logic.py``) talks to the background ``dsdseg`` worker
(``worker/``), which runs the engine (``engine/``) with Slicer's own Python.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, Decimals, SingleStep, WithinRange, parameterNodeWrapper
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
if MODULE_DIR not in sys.path:
    sys.path.insert(0, MODULE_DIR)


def resourcePath(relative: str) -> str:
    """``Resources/`` is next to the module in a build/install tree and one level up in the source tree."""
    for base in (os.path.join(MODULE_DIR, "Resources"), os.path.join(MODULE_DIR, "..", "Resources")):
        path = os.path.join(base, relative)
        if os.path.exists(path):
            return os.path.normpath(path)
    return os.path.join(MODULE_DIR, "Resources", relative)


def versionProblem() -> Optional[str]:
    from DSDSegmentationLib.bridge.dependencies import slicer_version_problem

    return slicer_version_problem(slicer.app.majorVersion, slicer.app.minorVersion)


class DSDSegmentation(ScriptedLoadableModule):
    """Module registration: title, category and credits shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DSDSegmentation")
        self.parent.categories = [_("Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DSDSegmentation Team (DSDSegmentation project)"]
        self.parent.helpText = _(
            "Segment hippocampus, cardiac and brain-tumour MRI with dual self-distillation (DSD) U-shaped networks. "
            "Pick the input volume(s) and a model, then Apply, or click on the structure. Inference runs in a "
            "background process on the GPU or the CPU; Slicer stays responsive and Cancel stops only that run. "
            "Requires Slicer 5.10 or newer."
        )
        self.parent.acknowledgementText = _(
            "DSD: Banerjee, Summerfield, Dong, Glide-Hurst, IEEE TBME 2025 (arXiv 2306.03271). Networks, losses and "
            "transforms from MONAI."
        )
        problem = versionProblem()
        if problem:
            self.parent.helpText = problem
            logging.warning(problem)
            return
        slicer.app.connect("startupCompleted()", registerTerminology)


def registerTerminology() -> None:
    """Load the custom terminology context that holds every segment type our models produce (SNOMED CT / NCIt
    codes, recommended colours), so Slicer's terminology selector and DICOM SEG export know them (once; the bridge
    decides)."""
    from DSDSegmentationLib.bridge.terminology import load_terminology_context

    try:
        load_terminology_context(slicer.modules.terminologies.logic())
    except AttributeError:  # Terminologies module not loaded (e.g. a reduced application)
        logging.warning("DSDSegmentation: Terminologies module unavailable; segments keep their coded tags only")
    except Exception as e:  # noqa: BLE001  (the module must still load; the segments keep their coded tags)
        logging.warning(f"DSDSegmentation: {e}; segments keep their coded tags only")


@parameterNodeWrapper
class DSDSegmentationParameterNode:
    """Every setting of the panel (the controllers' PARAMETERS, same names and defaults). A numeric field carries its
    range (the controllers' RANGES): Slicer's GUI connector replaces the spin box's .ui range with it."""

    inputVolume0: vtkMRMLScalarVolumeNode
    inputVolume1: vtkMRMLScalarVolumeNode
    inputVolume2: vtkMRMLScalarVolumeNode
    inputVolume3: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    allFrames: bool = False
    modelPath: str = ""
    device: Annotated[str, Choice(["auto", "cuda", "mps", "cpu"])] = "auto"
    tta: bool = False
    show3D: bool = True
    liveRerun: bool = True
    qaSegmentation: vtkMRMLSegmentationNode
    qaReference: vtkMRMLSegmentationNode
    qaVolume: vtkMRMLScalarVolumeNode
    qaToleranceMm: Annotated[float, WithinRange(0.1, 20.0), Decimals(2)] = 1.0
    finetuneVolume: vtkMRMLScalarVolumeNode
    finetuneSegmentation: vtkMRMLSegmentationNode
    finetuneFolder: Path = Path()
    finetuneEpochs: Annotated[int, WithinRange(1, 2000)] = 30
    finetuneLearningRate: Annotated[float, WithinRange(0.00001, 0.1), Decimals(5), SingleStep(0.0001)] = 0.001
    finetuneDSD: bool = False
    finetuneFreezeEncoder: bool = False
    finetuneName: str = ""


class DSDSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binding only: the .ui's widgets to the parameter node, buttons to the controllers, the processing state to
    labels, progress bars and button texts."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: Optional[DSDSegmentationLogic] = None
        self.panel = None
        self._parameterNode: Optional[DSDSegmentationParameterNode] = None
        self._parameterNodeGuiTag = None
        self._models: list[dict] = []
        self._timer = qt.QTimer()
        self._timer.setInterval(50)
        self._timer.connect("timeout()", self._tick)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        problem = versionProblem()
        if problem:
            label = qt.QLabel(problem)
            label.wordWrap = True
            self.layout.addWidget(label)
            return
        uiWidget = slicer.util.loadUI(resourcePath("UI/DSDSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DSDSegmentationLogic()
        registerTerminology()  # a module loaded after startup (Extension Wizard, reload) never saw startupCompleted
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.ui.applyButton.connect("clicked(bool)", lambda: self._run(self.panel.segment.apply, self.currentModel()))
        self.ui.uncertaintyButton.connect("clicked(bool)",
                                          lambda: self._run(self.panel.segment.apply, self.currentModel(), True))
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.placePointButton.connect("toggled(bool)", lambda on: self.onPlace("POINT", on))
        self.ui.placeRoiButton.connect("toggled(bool)", lambda on: self.onPlace("ROI", on))
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.nextErrorButton.connect("clicked(bool)", self.onNextError)
        self.ui.qaRestoreButton.connect("clicked(bool)", self.onRestoreDisplay)
        self.ui.addPairButton.connect("clicked(bool)", self.onAddPair)
        self.ui.removePairButton.connect("clicked(bool)", self.onRemovePair)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.exportModelButton.connect("clicked(bool)", self.onExportModel)
        self.ui.finetuneButton.connect("clicked(bool)", lambda: self.onFinetune(self._controllers().finetune.toggle))
        self.ui.resumeButton.connect("clicked(bool)",
                                     lambda: self.onFinetune(lambda m: self._controllers().finetune.start(m, resume=True)))
        self.refreshModels()
        self.initializeParameterNode()
        self._timer.start()

    def _controllers(self):
        """The panel's controllers over this scene, bound to the parameter node (made once)."""
        if self.panel is None:
            from DSDSegmentationLib.bridge.controllers import PanelController
            from DSDSegmentationLib.engine.cards import user_models_dir

            self.panel = PanelController(slicer.mrmlScene, self.logic.bridge(), self._parameterNode,
                                         model=self.currentModel, work_root=lambda: user_models_dir().parent / "finetune")
            self.panel.state.add_listener(self._showState)
            self.panel.prompt.on_placing_changed = self._showPlacing
            from DSDSegmentationLib.bridge.controllers import FINETUNE

            self._showState(FINETUNE, self.panel.state[FINETUNE])  # e.g. a fine-tune stopped in an earlier session
        self.panel.params = self.panel.segment.params = self.panel.prompt.params = self._parameterNode
        self.panel.qa.params = self.panel.finetune.params = self._parameterNode
        return self.panel

    def cleanup(self) -> None:
        self._timer.stop()
        if self.panel is not None:
            self.panel.shutdown()
        elif self.logic:
            self.logic.shutdown()
        self.removeObservers()

    def enter(self) -> None:
        if self.logic is not None:
            self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._showReadiness)

    def onSceneEndClose(self, caller, event) -> None:
        # the controllers reset themselves on the scene's StartCloseEvent; a new scene gets a new parameter node
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onNodeAdded(self, caller, event) -> None:
        qt.QTimer.singleShot(0, self._suggestInputs)  # once the selectors have shown the new volume

    def _suggestInputs(self) -> None:
        if self.panel is not None and self._parameterNode is not None:
            self.panel.segment.suggest_inputs(self.currentModel())  # multi-sequence inputs by volume name

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume0:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.inputVolume0 = first

    def setParameterNode(self, node: Optional[DSDSegmentationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._showReadiness)
        self._parameterNode = node
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._showReadiness)
            self._controllers()
            index = self.ui.modelComboBox.findData(self._parameterNode.modelPath)
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)
            self.onModelChanged()

    # ------------------------------------------------------------------------------------------------ models
    def refreshModels(self) -> None:
        from DSDSegmentationLib.engine.cards import list_models, model_summary, user_models_dir

        self._models = list_models()
        combo = self.ui.modelComboBox
        combo.blockSignals(True)
        combo.clear()
        for i, m in enumerate(self._models):
            label, tip = model_summary(m)
            combo.addItem(label, m["path"])
            combo.setItemData(i, tip, qt.Qt.ToolTipRole)
        combo.blockSignals(False)
        if not self._models:
            self.ui.statusLabel.text = _("No model found. Built-in models live in Resources/Models; user models in ") \
                + str(user_models_dir())

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(self.parent, _("Import a model package"), "", _("Model package (*.zip)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Could not import the model."), waitCursor=True):
                folder = self._controllers().import_model(path)
                self.refreshModels()
                index = self.ui.modelComboBox.findData(str(folder))
                if index >= 0:
                    self.ui.modelComboBox.setCurrentIndex(index)

    def onExportModel(self) -> None:
        model = self.currentModel()
        name = f"{model['id']}.zip" if model else "model.zip"
        path = qt.QFileDialog.getSaveFileName(self.parent, _("Export the model package"), name, _("Model package (*.zip)"))
        if path:
            with slicer.util.tryWithErrorDisplay(_("Could not export the model."), waitCursor=True):
                self.ui.statusLabel.text = _("Model written to {p}").format(p=self._controllers().export_model(model, path))

    def currentModel(self) -> Optional[dict]:
        i = self.ui.modelComboBox.currentIndex
        return self._models[i] if 0 <= i < len(self._models) else None

    def onModelChanged(self, *_args) -> None:
        model = self.currentModel()
        channels = self._controllers().segment.channels(model) if self._parameterNode else ["Input volume"]
        for i in range(MAX_INPUTS):
            visible = i < len(channels)
            getattr(self.ui, f"inputLabel{i}").setVisible(visible)
            getattr(self.ui, f"inputVolumeSelector{i}").setVisible(visible)
            if visible:
                getattr(self.ui, f"inputLabel{i}").text = channels[i] + ":"
        if self._parameterNode and model:
            self._parameterNode.modelPath = model["path"]
            self._suggestInputs()
        if model:
            from DSDSegmentationLib.engine.cards import model_summary

            self.ui.modelComboBox.toolTip = model_summary(model)[1]
        self._showReadiness()

    # ------------------------------------------------------------------------------------------------ actions
    def _run(self, action, *args) -> None:
        """Every action that may need torch/MONAI: dependencies first (with consent), errors shown, never raised."""
        with slicer.util.tryWithErrorDisplay(_("DSDSegmentation could not do that."), waitCursor=True):
            if not self.logic.ensureDependencies():
                return
            action(*args)
            self._showReadiness()

    def onPlace(self, which: str, checked: bool) -> None:
        from DSDSegmentationLib.bridge.controllers import PromptController

        cls = getattr(PromptController, which) if checked else None
        if checked:
            self._run(self._controllers().prompt.place, cls)
        elif self._controllers().prompt.placing == getattr(PromptController, which):
            self._controllers().prompt.place(None)

    def onCompare(self) -> None:
        self._run(self._controllers().qa.compare)  # Compare ↔ Cancel; the result arrives in _tick

    def _showComparison(self, result) -> None:
        self.ui.qaTableView.setMRMLTableNode(result.table)
        if result.models:
            legend = slicer.modules.colors.logic().AddDefaultColorLegendDisplayNode(next(iter(result.models.values())))
            if legend:
                legend.SetTitleText("mm")
        self.ui.qaRestoreButton.enabled = True
        self.onNextError()

    def onRestoreDisplay(self) -> None:
        self._controllers().qa.restore_display()
        self.ui.qaRestoreButton.enabled = False

    def onNextError(self) -> None:
        step = self._controllers().qa.next_error()
        self.ui.nextErrorButton.enabled = step is not None
        if step is None:
            return
        index, count, _ras, description = step
        slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(self.panel.qa.result.markups.GetID(), index, True)
        self.ui.qaStatusLabel.text = _("Error {i}/{n}: {d}").format(i=index + 1, n=count, d=description)

    def onAddPair(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Could not add the case."), waitCursor=False):
            self._controllers().finetune.add_case()
        self._showCases()

    def onRemovePair(self) -> None:
        self._controllers().finetune.remove_cases([item.row() for item in self.ui.pairsTable.selectedItems()])
        self._showCases()

    def onFinetune(self, action) -> None:
        self._run(action, self.currentModel())
        self._showChart(self.panel.finetune.plot_chart)

    def _showChart(self, chart) -> None:
        """A plot chart (fine-tune curves, a cine's volumes per frame) in the panel's plot view."""
        if chart is None:
            return
        view = self.ui.plotWidget.mrmlPlotViewNode()
        if view is None:
            view = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLPlotViewNode", "DSD fine-tune plot view")
            self.ui.plotWidget.setMRMLPlotViewNode(view)
        view.SetPlotChartNodeID(chart.GetID())

    # ------------------------------------------------------------------------------------------------ display
    def _tick(self) -> None:
        if self.panel is None:
            return
        done = self.panel.tick()
        environment = self.logic.bridge().environment()  # from the worker: Slicer's process never imports torch
        if environment and self.ui.environmentLabel.text != environment:
            self.ui.environmentLabel.text = environment
        seg = done["segment"]
        if seg is not None:
            run = self.panel.segment.result
            slicer.util.setSliceViewerLayers(background=run.inputs[0], fit=True)
            if run.uncertainty_node is not None:
                slicer.util.setSliceViewerLayers(foreground=run.uncertainty_node, foregroundOpacity=0.5)
                self.ui.qaTableView.setMRMLTableNode(run.uncertainty_table)
            if run.volumes_table is not None:  # all frames of a cine: the volumes per frame, as a table and a plot
                self.ui.qaTableView.setMRMLTableNode(run.volumes_table)
                self._showChart(run.volumes_chart)
        if done["qa"] is not None:
            self._showComparison(done["qa"])
        if done["finetune"] is not None:
            self.refreshModels()
            index = self.ui.modelComboBox.findData(done["finetune"]["package"])
            if index >= 0:
                self.ui.modelComboBox.setCurrentIndex(index)

    def _showState(self, kind: str, run) -> None:
        """The one place where the processing state reaches the panel."""
        from DSDSegmentationLib.bridge import controllers as C

        if kind in (C.SEGMENT, C.UNCERTAINTY):
            self.ui.statusLabel.text = run.message
            self.ui.progressBar.visible = run.active
            self.ui.progressBar.maximum = max(run.total, 1)
            self.ui.progressBar.value = run.done
            self.ui.applyButton.text = _("Cancel") if run.active else _("Apply")
            if kind == C.UNCERTAINTY:
                self.ui.qaStatusLabel.text = run.message
        elif kind == C.QA:
            self.ui.qaStatusLabel.text = run.message
            self.ui.compareButton.text = _("Cancel") if run.active else _("Compare")
        elif kind == C.PROMPT:
            self.ui.interactiveStatusLabel.text = run.message
        elif kind == C.FINETUNE:
            self.ui.finetuneStatusLabel.text = run.message
            self.ui.finetuneProgressBar.maximum = max(run.total, 1)
            self.ui.finetuneProgressBar.value = run.done
            self.ui.finetuneButton.text = _("Stop") if run.active else _("Fine-tune")
            self.ui.resumeButton.enabled = self.panel.finetune.can_resume
            self.ui.resumeButton.toolTip = self.panel.finetune.resume_description
        self._showReadiness()

    def _showPlacing(self, cls) -> None:
        from DSDSegmentationLib.bridge.controllers import PromptController

        for button, which in ((self.ui.placePointButton, PromptController.POINT), (self.ui.placeRoiButton, PromptController.ROI)):
            button.blockSignals(True)
            button.checked = cls == which
            button.blockSignals(False)

    def _showReadiness(self, caller=None, event=None) -> None:
        if self.panel is None or self._parameterNode is None:
            return
        enabled, tip, needsClick = self.panel.segment.readiness(self.currentModel())
        self.ui.applyButton.enabled = enabled
        self.ui.applyButton.toolTip = tip
        framesAvailable, framesTip = self.panel.segment.frames(self.currentModel())
        self.ui.allFramesCheckBox.enabled = framesAvailable
        self.ui.allFramesCheckBox.toolTip = framesTip
        if needsClick:
            self.ui.interactiveCollapsibleButton.collapsed = False

    def _showCases(self) -> None:
        rows = self._controllers().finetune.case_rows(self.currentModel())
        table = self.ui.pairsTable
        table.setHorizontalHeaderLabels([_("Volume"), _("Segmentation"), _("Label → segment")])
        table.setRowCount(len(rows))
        for r, texts in enumerate(rows):
            for c, text in enumerate(texts):
                table.setItem(r, c, qt.QTableWidgetItem(text))
        table.resizeColumnsToContents()


class DSDSegmentationLogic(ScriptedLoadableModuleLogic):
    """Slicer-side facade: parameter node, dependencies, and the Qt-free MRML bridge that does the work."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._bridge = None

    def getParameterNode(self):
        return DSDSegmentationParameterNode(super().getParameterNode())

    def bridge(self):
        if self._bridge is None:
            from DSDSegmentationLib.bridge.logic import SegmentationBridge

            python = shutil.which("PythonSlicer") or sys.executable
            env = {"PYTHONPATH": os.pathsep.join([MODULE_DIR, os.environ.get("PYTHONPATH", "")])}
            # temporary files where the user's Slicer keeps them (Application Settings → Modules → Temporary directory)
            self._bridge = SegmentationBridge(
                slicer.mrmlScene, python=python, env=env, temp_root=slicer.app.temporaryPath,
                temp_hint=_("choose a folder on a larger disk in Edit → Application Settings → Modules → Temporary directory"))
        return self._bridge

    def shutdown(self) -> None:
        if self._bridge is not None:
            self._bridge.shutdown()

    def ensureDependencies(self) -> bool:
        """torch only through PyTorch Utils (at least what MONAI needs), the rest of Resources/requirements.txt with
        the user's consent after saying what will be installed; Slicer's own packages are never replaced."""
        from DSDSegmentationLib.bridge import dependencies as deps

        try:
            import PyTorchUtils
        except ImportError:
            slicer.util.errorDisplay(_("DSDSegmentation needs the PyTorch extension. Install 'PyTorch' from the "
                                       "Extensions Manager and restart Slicer."))
            return False
        problem = deps.torch_problem()
        if problem:
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.installTorch(askConfirmation=True, torchVersionRequirement=deps.TORCH_REQUIREMENT) is None:
                return False
            if deps.torch_problem():
                slicer.util.errorDisplay(_("{p}. Update torch in the PyTorch Utils module, then restart Slicer.").format(p=problem))
                return False
        with open(resourcePath("requirements.txt"), encoding="utf-8") as f:
            actions = deps.plan(deps.read_requirements(f))
        if not actions:
            return True
        if not slicer.util.confirmOkCancelDisplay(deps.describe(actions)):
            return False
        with tempfile.TemporaryDirectory(prefix="dsdseg-pip-") as folder:
            slicer.util.pip_install(deps.install_arguments(actions, folder))
        if any(a.imported for a in actions):
            slicer.util.infoDisplay(_("Please restart Slicer to use the updated packages."))
            return False
        return True



class DSDSegmentationTest(ScriptedLoadableModuleTest):
    """Self-test in a real Slicer (``Testing/Slicer/run_selftest.py``): the model registry, then the bundled
    hippocampus model on a bundled sample case through the panel's Logic (background worker, import, terminology),
    checked against the case's manual label."""

    def setUp(self) -> None:
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """The light checks always (the Extensions factory runs this without torch and must not install it);
        inference only with DSDSEG_FULL_SELFTEST=1 (Testing/Slicer/run_selftest.py sets it)."""
        self.setUp()
        self.test_models_listed()
        self.setUp()
        self.test_panel_binds_as_designed()
        if os.environ.get("DSDSEG_FULL_SELFTEST") != "1":
            self.delayDisplay("Light self-test passed (set DSDSEG_FULL_SELFTEST=1 for the inference tests)")
            return
        self.setUp()
        self.test_segment_with_builtin_model()
        self.setUp()
        self.test_click_and_qa()
        self.setUp()
        self.test_all_frames_of_a_sequence()

    def test_models_listed(self) -> None:
        if MODULE_DIR not in sys.path:
            sys.path.insert(0, MODULE_DIR)
        from DSDSegmentationLib.engine.cards import list_models

        models = list_models()
        self.delayDisplay(f"{len(models)} model(s): " + ", ".join(f"{m['id']} ({m['status']})" for m in models))
        self.assertTrue(models and all(m["status"] == "ok" for m in models if m["source"] == "builtin"))
        self.assertTrue(os.path.isfile(resourcePath("Terminology/DSDSegmentation.term.json")))
        self.assertTrue(os.path.isfile(resourcePath("UI/DSDSegmentation.ui")))

    def test_panel_binds_as_designed(self) -> None:
        """What the headless tests assume of Slicer's GUI connectors and selectors, checked on the real panel: spin
        boxes keep the fields' ranges, the device list is the Choice list, a four-sequence model shows four inputs
        and each takes the volume named after its sequence (no torch needed)."""
        widget = slicer.modules.dsdsegmentation.widgetRepresentation().self()  # made (setup) on first request
        widget.enter()  # what Slicer does when the module is shown (--no-main-window shows none)
        ui = widget.ui
        self.assertEqual((ui.epochsSpinBox.minimum, ui.epochsSpinBox.maximum), (1, 2000))
        self.assertEqual((ui.lrSpinBox.minimum, ui.lrSpinBox.maximum, ui.lrSpinBox.decimals), (0.00001, 0.1, 5))
        self.assertEqual((ui.qaToleranceSpinBox.minimum, ui.qaToleranceSpinBox.maximum), (0.1, 20.0))
        self.assertEqual([ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)], ["auto", "cuda", "mps", "cpu"])
        index = next(i for i, m in enumerate(widget._models) if m["id"] == "brain-tumour-dsd")
        ui.modelComboBox.setCurrentIndex(index)
        self.assertEqual([getattr(ui, f"inputVolumeSelector{i}").isHidden() for i in range(MAX_INPUTS)], [False] * 4)
        for sequence in ("flair", "t1", "t1ce", "t2"):
            slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"BraTS_selftest_{sequence}")
        slicer.app.processEvents()  # the selectors show the new volumes, then the panel picks them by name
        params = widget._parameterNode
        picked = [getattr(params, f"inputVolume{i}").GetName() for i in range(4)]
        self.assertEqual(picked, [f"BraTS_selftest_{s}" for s in ("flair", "t1", "t1ce", "t2")])
        self.assertFalse(ui.allFramesCheckBox.enabled, "'All frames' is offered only for a sequence and a one-input model")
        self.delayDisplay("Panel bindings as designed")

    def test_segment_with_builtin_model(self) -> None:
        """The bundled hippocampus model on the bundled sample case: segments, names, terminology, Dice."""
        import numpy as np

        logic = DSDSegmentationLogic()
        self.assertTrue(logic.ensureDependencies())  # before anything below imports torch or MONAI
        from DSDSegmentationLib.bridge.demo import default_model, default_sample
        from DSDSegmentationLib.engine.cards import verify_package
        from DSDSegmentationLib.engine.data import list_cases
        from DSDSegmentationLib.engine.terminology import tag_string
        from DSDSegmentationLib.bridge.terminology import get_segment_terminology

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
        # the same volume moved by a transform (as a registration leaves it): the result follows it, voxel for voxel
        expected = {segmentation.GetNthSegment(i).GetName():
                    slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetNthSegmentID(i), volume)
                    for i in range(segmentation.GetNumberOfSegments())}
        transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "selftest registration")
        moved = vtk.vtkMatrix4x4()
        moved.SetElement(0, 3, 40.0)
        moved.SetElement(1, 3, -20.0)
        transform.SetMatrixTransformToParent(moved)
        volume.SetAndObserveTransformNodeID(transform.GetID())
        logic = DSDSegmentationLogic()
        try:
            seg = logic.bridge().segment([volume], str(default_model()), device="cpu")
        finally:
            logic.shutdown()
        self.assertEqual(seg.GetTransformNodeID(), transform.GetID())
        for i in range(seg.GetSegmentation().GetNumberOfSegments()):
            name = seg.GetSegmentation().GetNthSegment(i).GetName()
            got = slicer.util.arrayFromSegmentBinaryLabelmap(seg, seg.GetSegmentation().GetNthSegmentID(i), volume)
            self.assertTrue(np.array_equal(got, expected[name]), f"{name} moved with its volume")
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
            names = sorted(seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments()))
            self.assertEqual(len(names), 2)
            self.assertIsNone(region.side, "a crop around one hippocampus has no midline: no side in the names")
            preset = read_model_card(default_model())["preset"]
            reference = logic.bridge().import_labelmap(case.label, volume, preset, show_3d=False)
            result = QALogic(slicer.mrmlScene, logic.bridge()).compare(seg, reference, volume)  # in the warm worker
        finally:
            logic.shutdown()
        self.assertEqual(result.table.GetNumberOfRows(), 2)
        self.assertEqual(len(result.models), 2)
        for name, metrics in result.metrics.items():
            self.delayDisplay(f"{name}: Dice {metrics['dice']:.3f}, HD95 {metrics['hd95']:.2f} mm")
            self.assertGreater(metrics["dice"], 0.7)
        self.delayDisplay("Click and QA test passed")

    def test_all_frames_of_a_sequence(self) -> None:
        """'All frames' on a two-frame sequence (the bundled sample case twice) with Slicer's own Sequences module: a
        segmentation sequence synchronised with the browser, one result per frame, the volumes table."""
        logic = DSDSegmentationLogic()
        self.assertTrue(logic.ensureDependencies())
        from DSDSegmentationLib.bridge.demo import default_model, default_sample
        from DSDSegmentationLib.engine.data import list_cases

        case = list_cases(default_sample())[0]
        loaded = slicer.util.loadVolume(case.images[0])
        sequence = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceNode", "selftest cine")
        for value in ("0", "40"):
            sequence.SetDataNodeAtValue(loaded, value)
        slicer.mrmlScene.RemoveNode(loaded)
        browser = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "selftest cine browser")
        browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
        slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
        proxy = browser.GetProxyNode(sequence)
        try:
            seg = logic.bridge().segment([proxy], str(default_model()), device="cpu", all_frames=True)
        finally:
            logic.shutdown()
        results = browser.GetSequenceNode(seg)
        self.assertIsNotNone(results, "the result is a proxy of the cine's browser")
        self.assertEqual(results.GetNumberOfDataNodes(), 2)
        self.assertTrue(browser.GetSaveChanges(results))
        for item in (0, 1):
            browser.SetSelectedItemNumber(item)
            slicer.app.processEvents()
            self.assertEqual(seg.GetSegmentation().GetNumberOfSegments(), 2)
        table = slicer.mrmlScene.GetFirstNodeByName(f"{proxy.GetName()} segment volumes per frame")
        self.assertEqual(table.GetNumberOfRows(), 2)
        self.delayDisplay("All-frames test passed")
