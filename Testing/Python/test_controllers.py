"""The panel's controllers on a real MRML scene (slicer-core) with the event sequences Slicer produces: placing a
box ROI's two corners, moving a point, closing the scene. The widget only binds to these."""

from __future__ import annotations

import ast
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")
import vtk  # noqa: E402

from DSDSegmentationLib.bridge import controllers as C  # noqa: E402
from DSDSegmentationLib.bridge.demo import default_model, default_sample  # noqa: E402
from DSDSegmentationLib.bridge.logic import SegmentationBridge  # noqa: E402
from DSDSegmentationLib.engine.cards import list_models  # noqa: E402
from DSDSegmentationLib.engine.data import list_cases  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def hippocampus_model() -> dict:
    (m,) = [m for m in list_models() if m["id"] == "hippocampus-dsd"]
    return m


@pytest.fixture
def panel(scene, tmp_path: Path):
    params = SimpleNamespace(**C.PARAMETERS)
    bridge = SegmentationBridge(scene, warm=True, temp_root=tmp_path / "tmp")
    (tmp_path / "tmp").mkdir()
    model = hippocampus_model()
    p = C.PanelController(scene, bridge, params, model=lambda: model, work_root=lambda: tmp_path / "finetune")
    p.model_entry = model
    events: list[tuple[str, str]] = []
    p.state.add_listener(lambda kind, run: events.append((kind, run.status)))
    p.events = events
    yield p
    p.shutdown()


def run_until(panel, what: str, timeout: float = 120.0):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        out = panel.tick()
        if out[what] is not None:
            return out[what]
        if not panel.state.active() and panel.prompt.pending is None:
            return None
        time.sleep(0.02)
    raise TimeoutError(what)


def sample_volume(panel):
    case = list_cases(default_sample())[0]
    return panel.bridge.load_volume(case.images[0]), case


def test_parameter_node_declares_exactly_the_controller_settings() -> None:
    tree = ast.parse((ROOT / "DSDSegmentation" / "DSDSegmentation.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DSDSegmentationParameterNode"]
    fields = {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}
    assert fields == set(C.PARAMETERS)


def test_numeric_settings_out_of_range_are_refused_and_nothing_starts(panel, scene) -> None:
    """The panel's spin boxes hold each value in its range (the module's WithinRange annotations); a headless caller or
    an old saved scene may not: the controller names the setting and its range and starts nothing."""
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "A")
    ref = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "B")
    volume, _ = sample_volume(panel)
    panel.params.qaSegmentation, panel.params.qaReference, panel.params.qaVolume = seg, ref, volume
    for bad in (0.0, -1.0, float("inf"), float("nan"), 25.0):
        panel.params.qaToleranceMm = bad
        with pytest.raises(C.InputError, match=r"Surface Dice tolerance \(mm\) must be between 0.1 and 20"):
            panel.qa.compare()
        assert panel.qa.run is None and not panel.state.active(C.QA)
    panel.params.qaToleranceMm = 1.0
    for name, bad, words in (("finetuneEpochs", 0, "Epochs must be between 1 and 2000"),
                             ("finetuneLearningRate", -0.001, "Learning rate must be between 1e-05 and 0.1"),
                             ("finetuneLearningRate", 0.5, "Learning rate must be between 1e-05 and 0.1")):
        setattr(panel.params, name, bad)
        panel.finetune.start(panel.model_entry)
        assert panel.finetune.worker is None and panel.finetune.run is None
        assert panel.state[C.FINETUNE].status == C.FAILED and words in panel.state[C.FINETUNE].message
        setattr(panel.params, name, C.PARAMETERS[name])
    for name, (_label, low, high) in C.RANGES.items():
        assert low <= C.PARAMETERS[name] <= high


def test_multi_sequence_inputs_are_picked_by_volume_name(panel, scene) -> None:
    """Slicer's selectors all show the first volume loaded; for the four-sequence tumour model each input takes the
    one volume whose name names its sequence. A different volume the user picked is never replaced; an ambiguous or
    unnamed sequence is left to the user; a one-input model is left alone."""
    (tumour,) = [m for m in list_models() if m["id"] == "brain-tumour-dsd"]
    names = ["BraTS20_Training_001_flair", "BraTS20_Training_001_t1", "BraTS20_Training_001_t1ce", "BraTS20_Training_001_t2"]
    flair, t1, t1ce, t2 = (scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", n) for n in names)
    scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "seg_t1")  # a labelmap is never an input
    p = panel.params
    p.inputVolume0 = p.inputVolume1 = p.inputVolume2 = p.inputVolume3 = flair
    assigned = panel.segment.suggest_inputs(tumour)
    assert [p.inputVolume0, p.inputVolume1, p.inputVolume2, p.inputVolume3] == [flair, t1, t1ce, t2], assigned
    assert assigned == ["T1 ← BraTS20_Training_001_t1", "T1c ← BraTS20_Training_001_t1ce", "T2 ← BraTS20_Training_001_t2"]
    assert panel.state[C.SEGMENT].message.startswith("Inputs picked by their names: T1 ← ")
    assert panel.segment.suggest_inputs(tumour) == []  # nothing left to do: nothing changes

    # the user's own distinct choice (T2's volume for T1) stays; T2's volume is then taken, so T2 keeps the duplicate
    p.inputVolume0, p.inputVolume1, p.inputVolume2, p.inputVolume3 = flair, t2, flair, flair
    assert panel.segment.suggest_inputs(tumour) == ["T1c ← BraTS20_Training_001_t1ce"]
    assert [p.inputVolume0, p.inputVolume1, p.inputVolume2, p.inputVolume3] == [flair, t2, t1ce, flair]

    # two volumes named T1c: which one is not for us to guess
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 post Gd (repeat)")
    p.inputVolume0 = p.inputVolume1 = p.inputVolume2 = p.inputVolume3 = flair
    assert panel.segment.suggest_inputs(tumour) == ["T1 ← BraTS20_Training_001_t1", "T2 ← BraTS20_Training_001_t2"]
    assert p.inputVolume2 is flair

    p.inputVolume0 = t2
    assert panel.segment.suggest_inputs(panel.model_entry) == [] and p.inputVolume0 is t2  # one input: left alone
    assert [C.sequence_of(n) for n in ("T2 FLAIR AX", "Ax T1 +C", "MPRAGE", "t2_tse_tra", "cine MRI", "Volume")] == \
        ["FLAIR", "T1c", "T1", "T2", None, None]


def test_model_files_import_and_export_from_the_panel(panel, tmp_path: Path, monkeypatch) -> None:
    """Export the selected model as a zip, import a colleague's package into the user's models; nothing existing is
    replaced, a built-in model is not imported twice, each refusal names the problem."""
    monkeypatch.setenv("DSDSEG_MODELS", str(tmp_path / "store"))
    zip_path = panel.export_model(panel.model_entry, tmp_path / "hippocampus.zip")
    assert zip_path.is_file() and zip_path.stat().st_size > 1000
    before = zip_path.read_bytes()
    with pytest.raises(C.InputError, match="already exists; choose another file name"):
        panel.export_model(panel.model_entry, zip_path)
    assert zip_path.read_bytes() == before
    with pytest.raises(C.InputError, match="is a built-in model of this extension"):
        panel.import_model(zip_path)
    assert not (tmp_path / "store" / "hippocampus-dsd").exists()
    # a colleague's fine-tuned model: the same package under another id
    from conftest import renamed_copy

    colleague = renamed_copy(Path(panel.model_entry["path"]), tmp_path / "colleague", "hippocampus-ft-v1")
    shared = panel.export_model({"status": "ok", "path": str(colleague)}, tmp_path / "colleague.zip")
    folder = panel.import_model(shared)
    assert folder == tmp_path / "store" / "hippocampus-ft-v1"
    assert [m["status"] for m in list_models() if m["id"] == "hippocampus-ft-v1"] == ["ok"]
    with pytest.raises(C.InputError, match="already exists"):
        panel.import_model(shared)
    not_a_zip = tmp_path / "notes.zip"
    not_a_zip.write_text("not a zip")
    with pytest.raises(C.InputError, match="not a zip file"):
        panel.import_model(not_a_zip)
    with pytest.raises(C.InputError, match="Select a usable model"):
        panel.export_model({"id": "broken", "status": "sha256 mismatch"}, tmp_path / "broken.zip")


def test_processing_state_has_one_setter_and_tells_listeners() -> None:
    state = C.ProcessingState()
    seen = []
    state.add_listener(lambda kind, run: seen.append((kind, run.status, run.done, run.total)))
    state.set(C.SEGMENT, C.STARTING, "starting")
    state.set(C.SEGMENT, C.RUNNING, "windows", done=2, total=8)
    assert state.active(C.SEGMENT) and not state.active(C.FINETUNE)
    state.set(C.SEGMENT, C.DONE, "done")
    assert seen == [("segment", "starting", 0, 0), ("segment", "running", 2, 8), ("segment", "done", 2, 8)]
    with pytest.raises(ValueError):
        state.set("bogus", C.DONE)


def test_roi_placement_waits_for_the_second_corner(panel, scene) -> None:
    """Slicer places a box ROI with two control points and fires PointPositionDefinedEvent for each; the first
    leaves a zero-size box, on which the old panel ran ("region is too thin")."""
    volume, _ = sample_volume(panel)
    panel.params.inputVolume0 = volume
    placing = []
    panel.prompt.on_placing_changed = placing.append
    panel.prompt.place(C.PromptController.ROI)
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place
    roi = panel.prompt.nodes[C.PromptController.ROI]
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    c = [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2]
    roi.AddControlPoint(vtk.vtkVector3d(c[0] - 12, c[1] - 16, c[2] - 12))  # first corner: defined, size 0
    assert panel.prompt.pending is None and panel.prompt.placing == C.PromptController.ROI
    assert interaction.GetCurrentInteractionMode() == interaction.Place, "still placing the box"
    # the mouse moves: Slicer's markups widget keeps the second corner as a PositionPreview control point, and the
    # box already has a size that follows the mouse (vtkMRMLMarkupsROINode counts preview points); PointModified
    # (and here a defined event for the first corner again) fire on every move
    modify = roi.StartModify()
    i = roi.AddControlPoint(vtk.vtkVector3d(c[0] + 5, c[1] + 5, c[2] + 5))
    roi.ResetNthControlPointPosition(i)
    roi.EndModify(modify)
    roi.SetNthControlPointPositionWorld(i, c[0] + 8, c[1] + 10, c[2] + 6, roi.PositionPreview)
    assert roi.GetNthControlPointPositionStatus(i) == roi.PositionPreview and min(roi.GetSize()) > 5
    assert panel.prompt.pending is None, "a box whose second corner is a preview does not start a run"
    assert interaction.GetCurrentInteractionMode() == interaction.Place, "still placing the box"
    roi.SetNthControlPointPositionWorld(i, c[0] + 12, c[1] + 16, c[2] + 12)  # second click: a real box
    assert panel.prompt.pending is not None and panel.prompt.pending[1] == -1
    assert placing[-1] is None and interaction.GetCurrentInteractionMode() == interaction.ViewTransform
    seg = run_until(panel, "prompt")
    assert seg is not None, panel.state[C.PROMPT].message
    assert panel.state[C.PROMPT].status == C.DONE
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    assert panel.params.outputSegmentation is seg


def test_moves_are_debounced_and_live_rerun_is_a_setting(panel, scene, monkeypatch) -> None:
    volume, _ = sample_volume(panel)
    panel.params.inputVolume0 = volume
    starts = []
    real = panel.prompt.interactive.start
    monkeypatch.setattr(panel.prompt.interactive, "start", lambda *a, **k: starts.append(a[2]) or real(*a, **k))
    point = panel.prompt.node(C.PromptController.POINT)
    ijk_to_ras = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(ijk_to_ras)
    centre = list(ijk_to_ras.MultiplyPoint([17, 25, 17, 1])[:3])
    point.AddControlPoint(vtk.vtkVector3d(*centre))  # defined
    assert run_until(panel, "prompt") is not None and len(starts) == 1
    # a drag: three moves within the debounce time run once, at the last position
    t0 = 1000.0
    for i, dx in enumerate((0.5, 1.0, 1.5)):
        point.SetNthControlPointPosition(0, centre[0] + dx, centre[1], centre[2])
        panel.prompt.prompt_changed(point, defined=False, now=t0 + 0.1 * i)
    panel.prompt.tick(now=t0 + 0.25)
    assert len(starts) == 1, "still inside the debounce window"
    panel.prompt.tick(now=t0 + 0.2 + C.DEBOUNCE_S + 0.01)
    assert len(starts) == 2 and abs(starts[-1][0] - (centre[0] + 1.5)) < 1e-6
    assert run_until(panel, "prompt") is not None
    # live re-run off: a move (PointEndInteractionEvent) changes nothing
    panel.params.liveRerun = False
    point.InvokeEvent(slicer.vtkMRMLMarkupsNode.PointEndInteractionEvent)
    assert panel.prompt.pending is None


def click(panel, ijk) -> tuple:
    """A point placed on the input volume at voxel ``ijk`` (PointPositionDefinedEvent), past the debounce."""
    volume = panel.params.inputVolume0
    point = panel.prompt.node(C.PromptController.POINT)
    m = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(m)
    point.AddControlPoint(vtk.vtkVector3d(*m.MultiplyPoint([*ijk, 1])[:3]))
    panel.prompt.tick(now=time.monotonic() + 1)
    return point, m


def test_next_prompt_cancels_only_the_run_in_flight(panel) -> None:
    volume, _ = sample_volume(panel)
    panel.params.inputVolume0 = volume
    point, m = click(panel, [17, 25, 17])
    first = panel.prompt.region[0]
    pid = panel.bridge.server.proc.proc.pid
    point.AddControlPoint(vtk.vtkVector3d(*m.MultiplyPoint([18, 24, 16, 1])[:3]))
    panel.prompt.tick(now=time.monotonic() + 1)
    assert first.run.worker.result().status == "cancelled"
    assert run_until(panel, "prompt") is not None
    assert panel.bridge.server.proc.proc.pid == pid, "the warm worker survives the cancel"
    assert len(panel.prompt.regions) == 1


def test_segment_controller_readiness_apply_and_cancel(panel, scene) -> None:
    model = panel.model_entry
    seg_ctl = panel.segment
    assert seg_ctl.readiness(None)[0] is False
    assert seg_ctl.readiness(model) == (False, "Select every input volume: T1 MRI", False)
    big = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "whole head")
    slicer.util.updateVolumeFromArray(big, np.random.default_rng(0).normal(size=(120, 160, 160)).astype(np.float32))
    panel.params.inputVolume0 = big
    ok, tip, needs_click = seg_ctl.readiness(model)
    assert not ok and needs_click and "Click to segment" in tip
    volume, case = sample_volume(panel)
    panel.params.inputVolume0 = volume
    assert seg_ctl.readiness(model)[0]
    seg_ctl.apply(model)
    seg_ctl.apply(model)  # the same button while running: Cancel
    assert panel.state[C.SEGMENT].status == C.CANCELLED
    assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
    seg_ctl.apply(model)
    seg = run_until(panel, "segment")
    assert seg is not None and panel.params.outputSegmentation is seg
    assert panel.state[C.SEGMENT].status == C.DONE and "2 segments" in panel.state[C.SEGMENT].message
    assert (C.SEGMENT, C.IMPORTING) in panel.events


def test_qa_controller(panel, scene) -> None:
    volume, case = sample_volume(panel)
    preset = json.loads((default_model() / "model.json").read_text())["preset"]
    ref = panel.bridge.import_labelmap(case.label, volume, preset, show_3d=False)
    panel.params.qaSegmentation = panel.params.qaReference = ref
    panel.params.qaVolume = volume
    with pytest.raises(Exception, match="two different segmentations"):
        panel.qa.compare()
    panel.params.inputVolume0 = volume
    panel.segment.apply(panel.model_entry)
    seg = run_until(panel, "segment")
    panel.params.qaSegmentation = seg
    panel.params.qaToleranceMm = 2.0
    def qa_nodes():  # what Compare adds: the table, the colour map, the surfaces and the points
        return sorted(scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())
                      if scene.GetNthNode(i).GetName().startswith("QA "))

    panel.qa.compare()  # in the warm worker: returns at once, the scene is unchanged until a tick brings the result
    assert panel.state[C.QA].active and panel.qa.result is None and qa_nodes() == []
    result = run_until(panel, "qa")
    assert result is panel.qa.result and panel.state[C.QA].status == C.DONE
    assert "worst error point" in panel.state[C.QA].message
    assert panel.qa.run is None and list((panel.bridge.temp_root).iterdir()) == [], "no temporary files left"
    assert result.table.GetNumberOfRows() == 2
    n = panel.qa.error_count
    assert n > 0
    seen = [panel.qa.next_error()[0] for _ in range(n + 1)]
    assert seen == [*range(n), 0], "next worst error cycles through all of them"

    # Compare again, then Cancel (the same button): nothing is added, the earlier result stays, the worker lives on
    nodes = qa_nodes()
    assert len(nodes) == 5 and any(n.startswith("QA worst errors") for n in nodes)
    panel.qa.compare()
    panel.qa.compare()
    assert panel.state[C.QA].status == C.CANCELLED and panel.qa.run is None
    assert qa_nodes() == nodes and panel.qa.result is result
    assert list((panel.bridge.temp_root).iterdir()) == []
    panel.qa.compare()
    assert run_until(panel, "qa").table.GetNumberOfRows() == 2, "the warm worker still answers"


def test_scene_close_resets_every_section(panel, scene, tmp_path: Path) -> None:
    volume, _ = sample_volume(panel)
    panel.params.inputVolume0 = volume
    click(panel, [17, 25, 17])
    assert panel.prompt.region is not None
    panel.segment.apply(panel.model_entry)
    panel.finetune.cases.append(("vtkMRMLScalarVolumeNode1", "x", ""))
    scene.Clear(0)  # StartCloseEvent, as File → Close scene
    assert panel.prompt.region is None and panel.prompt.nodes == {} and panel.segment.run is None
    assert panel.finetune.cases == [] and panel.qa.result is None
    assert list((tmp_path / "tmp").iterdir()) == [], "no temporary files left"


def test_finetune_controller_cases_mapping_and_a_short_run(panel, scene, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("DSDSEG_MODELS", str(tmp_path / "store"))  # the worker registers the new model there
    model = panel.model_entry
    preset = model["card"]["preset"]
    with pytest.raises(Exception, match="Pick a volume"):
        panel.finetune.add_case()
    pairs = []
    for case in list_cases(default_sample())[:2]:
        volume = panel.bridge.load_volume(case.images[0])
        seg = panel.bridge.import_labelmap(case.label, volume, preset, show_3d=False)
        panel.params.finetuneVolume, panel.params.finetuneSegmentation = volume, seg
        panel.finetune.add_case()
        panel.finetune.add_case()  # twice: listed once
        pairs.append((volume, seg))
    # a researcher's own names, no terminology on one segment: matched by name, said so
    segmentation = pairs[1][1].GetSegmentation()
    sid = segmentation.GetSegmentIdBySegmentName("posterior hippocampus")
    segmentation.GetSegment(sid).SetTag(segmentation.GetSegment(sid).GetTerminologyEntryTagName(), "")
    rows = panel.finetune.case_rows(model)
    assert len(rows) == 2 and "posterior hippocampus → posterior hippocampus (name)" in rows[1][2]
    assert "(terminology)" in rows[0][2]
    panel.params.finetuneEpochs = 1
    panel.finetune.toggle(model)
    assert panel.state[C.FINETUNE].status == C.STARTING
    worker = panel.finetune.worker
    panel.finetune.start(model, resume=True)  # Resume (or a second start) while it runs never stops it
    assert panel.finetune.worker is worker and worker.running and panel.state[C.FINETUNE].status == C.STARTING
    t0 = time.monotonic()
    result = None
    while result is None and time.monotonic() - t0 < 300:
        result = panel.finetune.tick()
        if panel.state[C.FINETUNE].status in (C.FAILED, C.CANCELLED):
            break
        time.sleep(0.1)
    assert result is not None, panel.state[C.FINETUNE].message
    assert panel.state[C.FINETUNE].status == C.DONE and result["model_id"] in panel.state[C.FINETUNE].message
    assert panel.finetune.plot_table.GetTable().GetNumberOfRows() == 1
    assert not panel.finetune.can_resume


def test_finetune_stop_says_stopped_and_resume_continues(panel, scene, tmp_path: Path, monkeypatch) -> None:
    """The Stop button (toggle while running): the next ticks report "Stopped", Resume is offered and continues from
    the last finished epoch. Until session 11 a second ``stop`` method (the module-close one) replaced this one: the
    state stayed "Epoch 1/…", the button stayed Stop, and pressing it again started a new fine-tune."""
    monkeypatch.setenv("DSDSEG_MODELS", str(tmp_path / "store"))
    model = panel.model_entry
    for case in list_cases(default_sample())[:2]:
        volume = panel.bridge.load_volume(case.images[0])
        seg = panel.bridge.import_labelmap(case.label, volume, model["card"]["preset"], show_3d=False)
        panel.params.finetuneVolume, panel.params.finetuneSegmentation = volume, seg
        panel.finetune.add_case()
    panel.params.finetuneEpochs = 50

    def tick_until(done, limit: float = 300.0) -> None:
        t0 = time.monotonic()
        while not done() and time.monotonic() - t0 < limit:
            panel.finetune.tick()
            assert panel.state[C.FINETUNE].status != C.FAILED, panel.state[C.FINETUNE].message
            time.sleep(0.1)
        assert done(), panel.state[C.FINETUNE].message

    def epoch() -> int:
        message = panel.state[C.FINETUNE].message
        return int(message.split()[1].split("/")[0]) if message.startswith("Epoch ") else 0

    panel.finetune.toggle(model)  # Fine-tune
    tick_until(lambda: epoch() >= 1)
    stopped_at = epoch()
    panel.finetune.toggle(model)  # Stop
    assert "Stopping" in panel.state[C.FINETUNE].message
    tick_until(lambda: panel.state[C.FINETUNE].status == C.CANCELLED, 60)
    assert panel.state[C.FINETUNE].message == "Stopped. Resume continues from the last finished epoch."
    assert panel.finetune.worker is None and panel.finetune.can_resume and not panel.state[C.FINETUNE].active
    output = panel.finetune.run["output"]
    # Slicer restarted: a new panel, settings back to their defaults (30 epochs, not the run's 50), an empty scene
    # with no plot. Resume finds the stopped run in the work folder and continues it with its own settings.
    panel.shutdown()
    scene.Clear(0)
    later = C.PanelController(scene, panel.bridge, SimpleNamespace(**C.PARAMETERS), model=lambda: model,
                              work_root=lambda: tmp_path / "finetune")
    assert later.finetune.can_resume and later.finetune.run is None
    message = later.state[C.FINETUNE].message
    assert message.startswith("Resume the fine-tune of hippocampus-dsd started 20") and "of 50" in message, message
    later.finetune.start(model, resume=True)  # Resume
    assert later.finetune.run["output"] == output and later.finetune.worker is not None
    assert later.finetune.plot_table.GetTable().GetNumberOfRows() >= stopped_at  # the epochs before the restart
    panel = SimpleNamespace(finetune=later.finetune, state=later.state)  # tick_until / epoch() read these
    tick_until(lambda: epoch() >= 1)
    assert epoch() > stopped_at, "the resumed run went on from the last finished epoch, not from the start"
    assert later.state[C.FINETUNE].message.split()[1].rstrip(",").endswith("/50"), "the run kept its own 50 epochs"
    later.shutdown()


def test_finetune_controller_with_the_users_own_segments(panel, scene, tmp_path: Path, monkeypatch) -> None:
    """Segments named and coded unlike the model's labels: one whole 'Hippocampus' segment per case. The case table
    offers it as a new label, the run maps it to the merge of anterior and posterior, the new model carries it."""
    monkeypatch.setenv("DSDSEG_MODELS", str(tmp_path / "store"))
    model = panel.model_entry
    preset = model["card"]["preset"]
    for case in list_cases(default_sample())[:2]:
        volume = panel.bridge.load_volume(case.images[0])
        seg = panel.bridge.import_labelmap(case.label, volume, preset, show_3d=False)
        segmentation = seg.GetSegmentation()
        posterior = segmentation.GetSegmentIdBySegmentName("posterior hippocampus")
        anterior = segmentation.GetSegmentIdBySegmentName("anterior hippocampus")
        segmentation.RemoveSegment(posterior)  # the researcher's protocol: one whole hippocampus (painted roughly)
        segment = segmentation.GetSegment(anterior)
        segment.SetName("Hippocampus")
        segment.SetTag(segment.GetTerminologyEntryTagName(), "")
        panel.params.finetuneVolume, panel.params.finetuneSegmentation = volume, seg
        panel.finetune.add_case()
    rows = panel.finetune.case_rows(model)
    assert all("new label: Hippocampus" in r[2] and "not annotated: anterior hippocampus, posterior hippocampus" in r[2]
               for r in rows), rows
    panel.params.finetuneEpochs = 1
    panel.finetune.start(model)
    assert panel.finetune.mapping_lines == ["1 Hippocampus: merge of 1 anterior hippocampus + 2 posterior hippocampus"]
    t0 = time.monotonic()
    result = None
    while result is None and time.monotonic() - t0 < 300 and panel.state[C.FINETUNE].status not in (C.FAILED, C.CANCELLED):
        result = panel.finetune.tick()
        time.sleep(0.1)
    assert result is not None, panel.state[C.FINETUNE].message
    card = json.loads((Path(result["package"]) / "model.json").read_text())
    assert card["preset"]["labels"] == {"0": "background", "1": "Hippocampus"}
    assert card["label_mapping"][0]["kind"] == "merge"


def test_the_workers_notes_reach_the_done_message(panel, scene) -> None:
    """A note the worker writes about a finished run (here: the second sequence is on another grid and was resampled
    onto the first's) ends up in the panel's Done message, not only in a log line that the next message replaces."""
    from DSDSegmentationLib.engine.data import find_shared_data

    (model,) = [m for m in list_models() if m["id"] == "brain-tumour-dsd"]
    channels = model["card"]["inputs"]
    case = next(c for c in list_cases(find_shared_data() / "BraTS2018_2mm", channels=channels) if c.id == "Brats18_2013_3_1")
    volumes = [panel.bridge.load_volume(p) for p in case.images[:-1]]
    last_full = panel.bridge.load_volume(case.images[-1])
    last = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", f"{channels[-1]} cropped")
    ijk_to_ras = vtk.vtkMatrix4x4()
    last_full.GetIJKToRASMatrix(ijk_to_ras)
    slicer.util.updateVolumeFromArray(last, np.ascontiguousarray(slicer.util.arrayFromVolume(last_full)[5:]))  # KJI
    origin = ijk_to_ras.MultiplyPoint((0, 0, 5, 1))
    for r in range(3):
        ijk_to_ras.SetElement(r, 3, origin[r])
    last.SetIJKToRASMatrix(ijk_to_ras)  # 5 slices fewer: another grid over the same anatomy
    for i, v in enumerate([*volumes, last]):
        setattr(panel.params, f"inputVolume{i}", v)
    panel.model_entry = model
    panel.segment.apply(model)
    seg = run_until(panel, "segment", timeout=300)
    assert seg is not None and panel.state[C.SEGMENT].status == C.DONE
    message = panel.state[C.SEGMENT].message
    assert f"Note: '{channels[-1]} cropped' was resampled onto the grid of '{volumes[0].GetName()}'" in message, message


def test_a_click_uses_every_sequence_of_a_multi_sequence_model(panel, scene) -> None:
    """The panel's click with a brain-tumour model sends all its input volumes (not only the first): refused with
    a clear message while one is missing, a region with tumour segments once all are picked."""
    from DSDSegmentationLib.engine.data import find_shared_data

    (model,) = [m for m in list_models() if m["id"] == "brain-tumour-dsd"]
    channels = model["card"]["inputs"]
    case = next(c for c in list_cases(find_shared_data() / "BraTS2018_2mm", channels=channels) if c.id == "Brats18_2013_3_1")
    volumes = [panel.bridge.load_volume(p, name=ch) for p, ch in zip(case.images, channels)]
    panel.prompt.model = lambda: model
    panel.params.inputVolume0 = volumes[0]
    truth = panel.bridge.load_volume(case.label, labelmap=True)
    ijk = [int(v) for v in np.argwhere(slicer.util.arrayFromVolume(truth) > 0).mean(0)[::-1]]  # KJI -> IJK
    click(panel, ijk)
    assert panel.prompt.region is None and panel.state[C.PROMPT].status == C.FAILED
    assert f"the model needs {len(channels)} input volumes ({', '.join(channels)})" in panel.state[C.PROMPT].message
    for i, v in enumerate(volumes):
        setattr(panel.params, f"inputVolume{i}", v)
    click(panel, ijk)
    seg = run_until(panel, "prompt", timeout=300)
    assert seg is not None and panel.state[C.PROMPT].status == C.DONE, panel.state[C.PROMPT].message
    segmentation = seg.GetSegmentation()
    names = {segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())}
    assert names == {n for v, n in model["card"]["preset"]["labels"].items() if v != "0"}
    tumour = sum(int(slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetNthSegmentID(i), volumes[0]).sum())
                 for i in range(segmentation.GetNumberOfSegments()))
    assert tumour > 0


def test_out_of_memory_says_what_helps_on_each_run() -> None:
    """Inference moves to the CPU by itself when a GPU runs out, so 'try the CPU' helps only a fine-tune on a GPU;
    a segmentation or QA that ran out ran out of the computer's memory."""
    from DSDSegmentationLib.worker.process import WorkerError

    oom = WorkerError("the run failed: out of memory: not enough memory", "out of memory", 3)
    for kind, device, words, never in ((C.SEGMENT, "cuda", "crop the volume", "on the CPU (Options"),
                                       (C.PROMPT, "auto", "crop the volume", "on the CPU (Options"),
                                       (C.QA, "auto", "crop the volume", "on the CPU (Options"),
                                       (C.FINETUNE, "cuda", "Try again on the CPU (Options → device: cpu)", "crop"),
                                       (C.FINETUNE, "cpu", "fewer or smaller (cropped) cases", "on the CPU (Options")):
        state = C.ProcessingState()
        C._failure(state, kind, oom, device)
        message = state[kind].message
        assert state[kind].status == C.FAILED and state[kind].out_of_memory, (kind, message)
        assert words in message and never not in message, (kind, device, message)
    state = C.ProcessingState()
    C._failure(state, C.SEGMENT, WorkerError("the run failed: crash: boom", "crash", 1), "cuda")
    assert state[C.SEGMENT].message == "the run failed: crash: boom" and not state[C.SEGMENT].out_of_memory


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_worker_killed_as_the_out_of_memory_killer_does_says_so_and_the_next_apply_works(panel, scene) -> None:
    """Linux's out-of-memory killer ends the worker with SIGKILL and nothing on its streams: the panel names the
    likely cause and what helps instead of 'ended unexpectedly', keeps nothing half-made, and the next Apply starts
    a new worker."""
    volume, case = sample_volume(panel)
    panel.params.inputVolume0 = volume
    model = hippocampus_model()
    segmentations = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    panel.segment.apply(model)
    worker = panel.bridge.server.proc
    os.kill(worker.proc.pid, signal.SIGKILL)  # before it answers: the request is in flight
    assert run_until(panel, "segment") is None
    run = panel.state[C.SEGMENT]
    assert run.status == C.FAILED and run.out_of_memory, run.message
    assert "killed by the system (SIGKILL), most often because the computer ran out of memory" in run.message
    assert "crop the volume" in run.message and "ended unexpectedly" not in run.message, run.message
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations
    panel.segment.apply(model)
    seg = run_until(panel, "segment", timeout=300)
    assert seg is not None and panel.state[C.SEGMENT].status == C.DONE, panel.state[C.SEGMENT].message
    assert panel.bridge.server.proc is not worker


def test_the_next_patients_apply_never_replaces_the_last_patients_result(panel, scene) -> None:
    """After Apply the panel keeps its result selected as the output segmentation. Until session 15 an Apply on
    another volume (the next patient) then wrote into it: the first patient's segments were replaced by the second
    one's, in a node named after the first. Now a segmentation the module made for another volume is left as it is
    and the result goes into a new one (the message says so); the same volume again still replaces its own result."""
    from DSDSegmentationLib.bridge.logic import segment_array

    cases = list_cases(default_sample())[:2]
    first = panel.bridge.load_volume(cases[0].images[0], "patient A")
    second = panel.bridge.load_volume(cases[1].images[0], "patient B")
    model = hippocampus_model()

    def arrays(seg, volume):
        s = seg.GetSegmentation()
        return {s.GetNthSegment(i).GetName(): segment_array(seg, s.GetNthSegmentID(i), volume)
                for i in range(s.GetNumberOfSegments())}

    panel.params.inputVolume0 = first
    panel.segment.apply(model)
    seg_a = run_until(panel, "segment")
    assert seg_a is not None and panel.params.outputSegmentation is seg_a
    before = arrays(seg_a, first)
    panel.params.inputVolume0 = second
    panel.segment.apply(model)
    seg_b = run_until(panel, "segment")
    assert seg_b is not None and seg_b is not seg_a and panel.params.outputSegmentation is seg_b
    assert seg_b.GetName() == "patient B segmentation"
    message = panel.state[C.SEGMENT].message
    assert ("'patient A segmentation' holds the result for 'patient A' and was left as it is; the result for "
            "'patient B' is in a new segmentation") in message, message
    after = arrays(seg_a, first)
    assert sorted(after) == sorted(before) and all(np.array_equal(after[k], before[k]) for k in before)
    panel.segment.apply(model)  # patient B again: its own (unedited) result is replaced in place
    assert run_until(panel, "segment") is seg_b
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2


def test_every_controller_call_of_the_widget_exists(panel) -> None:
    """The widget (never run here: no Slicer binary) reaches the controllers as ``self.panel.<section>.<name>`` or
    ``self._controllers().<section>.<name>`` and the bridge as ``self.logic.bridge().<name>``: each such name must exist
    on the real objects, or the button fails only in a real Slicer (a renamed controller method is otherwise caught
    by nothing but a user)."""
    tree = ast.parse((ROOT / "DSDSegmentation" / "DSDSegmentation.py").read_text(encoding="utf-8"))

    def chain(node: ast.AST) -> list[str] | None:
        """['panel', 'segment', 'apply'] for self.panel.segment.apply; _controllers() and bridge() count as names."""
        names: list[str] = []
        while True:
            if isinstance(node, ast.Attribute):
                names.append(node.attr)
                node = node.value
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and not node.args:
                names.append(node.func.attr + "()")
                node = node.func.value
            elif isinstance(node, ast.Name) and node.id == "self":
                return names[::-1]
            else:
                return None

    roots = {"panel": panel, "_controllers()": panel}
    checked, missing = set(), []
    for node in ast.walk(tree):
        names = chain(node)
        if not names or len(names) < 2:
            continue
        if names[0] in roots:
            obj, rest = roots[names[0]], names[1:3]  # a section and its member (or a member of the panel)
        elif names[:2] == ["logic", "bridge()"] and len(names) > 2:
            obj, rest = panel.bridge, names[2:3]
        else:
            continue
        path = ".".join(names[: len(rest) + 1 + (names[0] == "logic")])
        if path in checked:
            continue
        checked.add(path)
        for name in (n.removesuffix("()") for n in rest):
            if not hasattr(obj, name):
                missing.append(path)
                break
            obj = getattr(obj, name)
    assert len(checked) > 25, sorted(checked)
    assert not missing, f"the widget calls what the controllers do not have: {missing}"

    # and each call passes what the method takes (positional count, keyword names)
    import inspect

    wrong, calls = [], 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(isinstance(a, ast.Starred) for a in node.args) or \
                any(k.arg is None for k in node.keywords):
            continue
        if chain(node.func) == ["_run"] and node.args:  # self._run(action, *args) calls action(*args)
            node = ast.Call(func=node.args[0], args=node.args[1:], keywords=[], lineno=node.lineno)
        names = chain(node.func)
        if not names or len(names) < 2:
            continue
        if names[0] in roots:
            obj, rest = roots[names[0]], names[1:]
        elif names[:2] == ["logic", "bridge()"] and len(names) > 2:
            obj, rest = panel.bridge, names[2:]
        else:
            continue
        if len(rest) > 2 or any(n.endswith("()") for n in rest[:-1]):
            continue  # a call on what a controller returned or holds: not the controller's own method
        for name in (n.removesuffix("()") for n in rest):
            obj = getattr(obj, name)
        if not callable(obj) or isinstance(obj, type):
            continue
        calls += 1
        try:
            inspect.signature(obj).bind(*node.args, **{k.arg: k.value for k in node.keywords})
        except TypeError as e:
            wrong.append(f"line {node.lineno}: {'.'.join(names)}(...): {e}")
    assert calls > 12 and not wrong, wrong
