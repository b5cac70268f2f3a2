"""A cine MRI series loaded as a sequence (Sequences module: one volume per frame, shown through a proxy volume that
the sequence browser fills with the selected frame), on a real MRML scene with Slicer's Sequences logic.

'All frames' segments every frame into a new segmentation sequence that the same browser shows frame by frame, with
the segments' volumes per frame and the ventricles' ejection fraction. A one-frame Apply whose frame changed while
the worker ran (the browser moved or played) adds nothing: its result belongs to a frame no longer shown. Real ACDC
frames (end-diastole and end-systole of a validation patient of the shipped cardiac model) stand in for a cine."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")

from DSDSegmentationLib.bridge.controllers import DONE, FAILED, PARAMETERS, ProcessingState, SegmentController  # noqa: E402
from DSDSegmentationLib.bridge.logic import MADE_FOR, SegmentationBridge, no_leftover_nodes, segment_array  # noqa: E402
from DSDSegmentationLib.bridge.sequences import cine_of  # noqa: E402
from DSDSegmentationLib.engine.cards import builtin_models_dir  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data  # noqa: E402
from DSDSegmentationLib.engine.errors import InputError  # noqa: E402

FRAMES = ("patient001_frame01", "patient001_frame12")  # ED and ES; patient001 is in the cardiac model's validation split
TIMES = ("0", "352")


@pytest.fixture
def bridge(scene, tmp_path: Path):
    b = SegmentationBridge(scene, warm=True, temp_root=tmp_path / "temp")
    (tmp_path / "temp").mkdir()
    yield b
    b.shutdown()


def acdc() -> Path:
    return find_shared_data() / "ACDC_subset"


def cine(scene, bridge, name: str = "cine"):
    """A two-frame cine sequence as the Sequences module holds one, its browser and its proxy volume."""
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", f"{name} sequence")
    sequence.SetIndexName("time")
    sequence.SetIndexUnit("ms")
    for frame, time_ms in zip(FRAMES, TIMES):
        loaded = bridge.load_volume(acdc() / "imagesTr" / f"{frame}.nii.gz", frame)
        node = slicer.vtkMRMLScalarVolumeNode()  # a frame as a series reader makes it: voxels and geometry only
        node.SetName(frame)
        node.CopyOrientation(loaded)
        node.SetAndObserveImageData(loaded.GetImageData())
        sequence.SetDataNodeAtValue(node, time_ms)
        scene.RemoveNode(loaded)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", f"{name} browser")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    slicer.modules.sequences.logic().UpdateProxyNodesFromSequences(browser)
    proxy = browser.GetProxyNode(sequence)
    proxy.SetName(name)
    return sequence, browser, proxy


def reference(bridge, frame: str) -> np.ndarray:
    with no_leftover_nodes(bridge.scene):  # the loaded labelmap's display node goes with it
        node = bridge.load_volume(acdc() / "labelsTr" / f"{frame}.nii.gz", f"{frame} reference", labelmap=True)
        try:
            return slicer.util.arrayFromVolume(node).copy()
        finally:
            bridge.scene.RemoveNode(node)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float(np.logical_and(a, b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def wait(run) -> list[dict]:
    records = []
    while run.worker.running:
        records += run.worker.poll()
        time.sleep(0.05)
    return records + run.worker.poll()


def test_all_frames_become_a_segmentation_sequence_shown_frame_by_frame(scene, bridge, tmp_path: Path) -> None:
    sequence, browser, proxy = cine(scene, bridge)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")  # the cine moved in the views
    a = math.radians(20)
    moved.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(np.array(
        [[math.cos(a), -math.sin(a), 0, 12.0], [math.sin(a), math.cos(a), 0, -7.0], [0, 0, 1, 3.0], [0, 0, 0, 1]])))
    proxy.SetAndObserveTransformNodeID(moved.GetID())
    model = builtin_models_dir() / "cardiac-dsd"
    before = {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}

    run = bridge.start([proxy], model, device="cpu", all_frames=True)
    records = wait(run)
    seg = bridge.finish(run)

    # one bar over the frames, named as the user reads them
    cases = [r for r in records if r.get("stage") == "cases"]
    assert [(r["done"], r["total"]) for r in cases] == [(1, 2), (2, 2)]
    assert cases[0]["message"] == "frame 1 (time 0 ms), 1 of 2"
    assert not any(r.get("stage") == "predict" for r in records), "no per-frame bars in between"
    # a new segmentation sequence, synchronised with the cine's browser, shown through a new proxy segmentation
    result_sequence = browser.GetSequenceNode(seg)
    assert result_sequence is not None and result_sequence is not sequence
    assert result_sequence.GetNumberOfDataNodes() == 2
    assert [result_sequence.GetNthIndexValue(i) for i in range(2)] == list(TIMES)
    assert (result_sequence.GetIndexName(), result_sequence.GetIndexUnit()) == ("time", "ms")
    assert browser.GetSaveChanges(result_sequence), "corrections in Segment Editor stay with their frame"
    assert seg.GetName() == "cine segmentation" and seg.GetAttribute(MADE_FOR) == proxy.GetID()
    assert seg.GetTransformNodeID() == moved.GetID(), "the result follows the cine's transform"
    # scrolling the browser shows each frame's own result, aligned with the frame shown (Dice against ACDC's labels)
    per_frame = []
    for i, frame in enumerate(FRAMES):
        browser.SetSelectedItemNumber(i)
        truth = reference(bridge, frame)
        s = seg.GetSegmentation()
        assert s.GetNumberOfSegments() == 3
        scores = {s.GetNthSegment(j).GetName(): dice(segment_array(seg, s.GetNthSegmentID(j), proxy) > 0, truth == j + 1)
                  for j in range(3)}
        per_frame.append(scores)
        assert min(scores.values()) > 0.75, (frame, scores)
        assert scores["left ventricle cavity"] > 0.88, (frame, scores)
    # the volumes table: one row per frame, each volume = the segment's voxels x the voxel volume
    table = run.volumes_table.GetTable()
    assert run.volumes_table.GetName() == "cine segment volumes per frame"
    assert [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())] == [
        "Frame", "time (ms)", "right ventricle cavity (mL)", "left ventricle myocardium (mL)",
        "left ventricle cavity (mL)"]
    assert [table.GetValue(r, 1).ToString() for r in range(2)] == list(TIMES)
    voxel_ml = float(np.prod(proxy.GetSpacing())) / 1000.0
    truth_lv = [float((reference(bridge, f) == 3).sum()) * voxel_ml for f in FRAMES]
    for r in range(2):
        browser.SetSelectedItemNumber(r)
        sid = seg.GetSegmentation().GetSegmentIdBySegmentName("left ventricle cavity")
        ours = float((segment_array(seg, sid, proxy) > 0).sum()) * voxel_ml
        assert table.GetValue(r, 4).ToDouble() == pytest.approx(ours, abs=0.01)
        assert ours == pytest.approx(truth_lv[r], rel=0.15)
    # the ejection fraction in the notes, near the one the reference labels give (patient001: a dilated LV)
    truth_ef = 100 * (truth_lv[0] - truth_lv[1]) / truth_lv[0]
    (lv_note,) = [n for n in run.notes if n.startswith("left ventricle ejection fraction")]
    ef = float(lv_note.split()[4])
    assert abs(ef - truth_ef) < 6, (lv_note, truth_ef)
    assert "largest" in lv_note and "in frame 1 (time 0 ms)" in lv_note and "in frame 2 (time 352 ms)" in lv_note
    (rv_note,) = [n for n in run.notes if n.startswith("right ventricle ejection fraction")]
    assert rv_note.endswith("against the manual reference on this model's 10 validation patients: -6.6 ± 11.4 points "
                            "(95 % limits of agreement -28.9 to +15.7), r = 0.59)"), rv_note
    (mass,) = [n for n in run.notes if n.startswith("left ventricle mass")]  # the myocardium at end-diastole
    assert mass.startswith("left ventricle mass ") and " g (myocardium at 1.05 g/mL in frame 1 (time 0 ms); " in mass
    assert float(mass.split()[3]) == pytest.approx(table.GetValue(0, 3).ToDouble() * 1.05, abs=0.5), mass
    assert not any(n.startswith("left ventricle myocardium") for n in run.notes)
    # nothing else left behind: the proxy, its sequence and the table are the only new nodes with a name a user sees
    new = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()) if scene.GetNthNode(i).GetID() not in before]
    visible = sorted(n.GetClassName() for n in new if not n.IsA("vtkMRMLDisplayNode") and not n.IsA("vtkMRMLStorageNode"))
    assert visible == ["vtkMRMLPlotChartNode"] + ["vtkMRMLPlotSeriesNode"] * 3 + [
        "vtkMRMLSegmentationNode", "vtkMRMLSequenceNode", "vtkMRMLTableNode"], visible
    chart = run.volumes_chart
    assert [(chart.GetNthPlotSeriesNode(i).GetTableNodeID(), chart.GetNthPlotSeriesNode(i).GetYColumnName())
            for i in range(3)] == [(run.volumes_table.GetID(), f"{n} (mL)") for n in (
                "right ventricle cavity", "left ventricle myocardium", "left ventricle cavity")]
    display = [n for n in new if n.IsA("vtkMRMLDisplayNode")]
    assert [n.GetDisplayableNode() for n in display] == [seg], "one display node, the result's: none left orphaned"
    assert list((tmp_path / "temp").iterdir()) == []
    # an edit on the frame shown stays with that frame (the browser saves the proxy into its item)
    browser.SetSelectedItemNumber(1)
    seg.GetSegmentation().RemoveSegment(seg.GetSegmentation().GetSegmentIdBySegmentName("left ventricle myocardium"))
    browser.SetSelectedItemNumber(0)
    assert seg.GetSegmentation().GetNumberOfSegments() == 3
    browser.SetSelectedItemNumber(1)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    # saved as a scene bundle (storage nodes added as Slicer's Save dialog does) and opened again: every frame's
    # result, the edit included, comes back
    from DSDSegmentationLib.bridge.headless import read_mrb, setup_headless

    for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
        if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode() is None and not node.IsA("vtkMRMLTableNode"):
            node.AddDefaultStorageNode()
    assert scene.WriteToMRB(str(tmp_path / "cine.mrb"))
    reopened, app, _ = setup_headless()
    try:
        assert read_mrb(reopened, app, tmp_path / "cine.mrb", tmp_path / "cache")
        (saved,) = [n for n in (reopened.GetNthNodeByClass(i, "vtkMRMLSequenceNode")
                                for i in range(reopened.GetNumberOfNodesByClass("vtkMRMLSequenceNode")))
                    if n.GetName() == "cine segmentation sequence"]
        assert [saved.GetNthDataNode(i).GetSegmentation().GetNumberOfSegments() for i in range(2)] == [3, 2]
    finally:
        reopened.Clear(1)


def test_a_frame_change_while_one_frame_is_segmented_adds_nothing(scene, bridge, tmp_path: Path) -> None:
    sequence, browser, proxy = cine(scene, bridge)
    browser.SetSelectedItemNumber(0)
    model = builtin_models_dir() / "cardiac-dsd"
    segs = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    run = bridge.start([proxy], model, device="cpu")
    browser.SetSelectedItemNumber(1)  # the user scrolls on (or playback runs) while the worker works
    wait(run)
    with pytest.raises(InputError, match=r"'cine' went from frame 1 \(time 0 ms\) to frame 2 \(time 352 ms\) while "
                                         r"segmenting .*nothing was added"):
        bridge.finish(run)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segs
    assert list((tmp_path / "temp").iterdir()) == []
    # while the browser plays, a one-frame Apply is refused at once, naming what to do
    browser.SetPlaybackActive(True)
    with pytest.raises(InputError, match="'cine' is playing .*stop playback on the frame you want first, or check "
                                         "'All frames'"):
        bridge.start([proxy], model, device="cpu")
    browser.SetPlaybackActive(False)
    assert list((tmp_path / "temp").iterdir()) == []
    # on the frame it started from, the same Apply lands
    run = bridge.start([proxy], model, device="cpu")
    wait(run)
    seg = bridge.finish(run)
    assert seg.GetSegmentation().GetNumberOfSegments() == 3


def test_a_click_whose_frame_changed_meanwhile_adds_nothing(scene, bridge, tmp_path: Path) -> None:
    from DSDSegmentationLib.bridge.interactive import InteractiveLogic

    sequence, browser, proxy = cine(scene, bridge)
    browser.SetSelectedItemNumber(1)
    interactive = InteractiveLogic(bridge)
    model = builtin_models_dir() / "cardiac-dsd"
    bounds = [0.0] * 6
    proxy.GetRASBounds(bounds)
    centre = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
    nodes = scene.GetNumberOfNodes()
    region = interactive.start(proxy, model, centre, size_mm=[120, 120, 80], device="cpu")
    browser.SetSelectedItemNumber(0)
    wait(region.run)
    with pytest.raises(InputError, match=r"'cine' went from frame 2 \(time 352 ms\) to frame 1 \(time 0 ms\)"):
        interactive.finish(region)
    assert scene.GetNumberOfNodes() == nodes, "no segmentation, no crop left"
    assert list((tmp_path / "temp").iterdir()) == []


def test_a_compare_whose_frame_changed_meanwhile_shows_nothing(scene, bridge, tmp_path: Path) -> None:
    from DSDSegmentationLib.bridge.qa_logic import QALogic
    from DSDSegmentationLib.engine.cards import read_model_card

    sequence, browser, proxy = cine(scene, bridge)
    preset = read_model_card(builtin_models_dir() / "cardiac-dsd")["preset"]
    label = acdc() / "labelsTr" / f"{FRAMES[0]}.nii.gz"
    ours, reference = (bridge.import_labelmap(label, proxy, preset, show_3d=False) for _ in range(2))
    nodes = scene.GetNumberOfNodes()
    qa = QALogic(scene, bridge)
    run = qa.start_compare(ours, reference, proxy)
    browser.SetSelectedItemNumber(1)
    wait(run)
    with pytest.raises(InputError, match=r"'cine' went from frame 1 \(time 0 ms\) to frame 2 \(time 352 ms\) while "
                                         "comparing"):
        qa.finish_compare(run)
    assert scene.GetNumberOfNodes() == nodes and list((tmp_path / "temp").iterdir()) == []


def test_all_frames_is_refused_by_name_where_it_cannot_run(scene, tmp_path: Path) -> None:
    bridge = SegmentationBridge(scene, warm=False, temp_root=tmp_path)
    sequence, browser, proxy = cine(scene, bridge)
    plain = bridge.load_volume(acdc() / "imagesTr" / f"{FRAMES[0]}.nii.gz", "plain")
    cardiac = builtin_models_dir() / "cardiac-dsd"
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="'plain' is not a sequence .*'All frames' needs one"):
        bridge.start([plain], cardiac, all_frames=True)
    with pytest.raises(InputError, match="uncertainty map is made for one frame"):
        bridge.start([proxy], cardiac, all_frames=True, uncertainty=True)
    tumour = builtin_models_dir() / "brain-tumour-dsd"
    with pytest.raises(InputError, match="'All frames' works with one-input models; this model needs 4 input volumes"):
        bridge.start([proxy, plain, plain, plain], tumour, all_frames=True)
    assert scene.GetNumberOfNodes() == nodes and list(tmp_path.iterdir()) == []
    # the panel offers the option only where it can run, and says why not elsewhere
    params = type("Params", (), dict(PARAMETERS))()
    controller = SegmentController(bridge, ProcessingState(), params)
    card = {"card": {"preset": {"channels": ["cine MRI"]}}}
    params.inputVolume0 = plain
    assert controller.frames(card) == (False, "Segment every frame of a sequence (a cine series): pick a volume that "
                                              "shows one as the input")
    params.inputVolume0 = proxy
    ok, tip = controller.frames(card)
    assert ok and tip.startswith("Segment all 2 frames of 'cine sequence' into a new segmentation sequence")
    assert controller.frames({"card": {"preset": {"channels": ["FLAIR", "T1c"]}}})[0] is False


def test_cancel_during_all_frames_adds_nothing(scene, bridge, tmp_path: Path) -> None:
    sequence, browser, proxy = cine(scene, bridge)
    nodes = scene.GetNumberOfNodes()
    run = bridge.start([proxy], builtin_models_dir() / "cardiac-dsd", device="cpu", all_frames=True)
    bridge.cancel(run)
    assert scene.GetNumberOfNodes() == nodes
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 0
    assert list((tmp_path / "temp").iterdir()) == []


def test_the_panel_segments_all_frames_and_says_what_it_made(scene, tmp_path: Path) -> None:
    """Through the panel's controller, with a one-shot worker (``dsdseg predict --batch``) instead of the warm one."""
    from DSDSegmentationLib.engine.cards import list_models

    bridge = SegmentationBridge(scene, warm=False, temp_root=tmp_path)
    sequence, browser, proxy = cine(scene, bridge)
    (model,) = [m for m in list_models() if m.get("id") == "cardiac-dsd"]
    params = type("Params", (), dict(PARAMETERS))()
    params.inputVolume0, params.allFrames, params.device = proxy, True, "cpu"
    state = ProcessingState()
    controller = SegmentController(bridge, state, params)
    # the frames are imported one per tick (Slicer's event loop runs in between); Cancel part-way adds nothing
    nodes = scene.GetNumberOfNodes()
    ids = {scene.GetNthNode(i).GetID() for i in range(nodes)}
    controller.apply(model)
    for _ in range(6000):
        controller.tick()
        if state["segment"].message.startswith("Importing frame"):
            break
        time.sleep(0.05)
    assert (state["segment"].message, state["segment"].done, state["segment"].total) == ("Importing frame 1 of 2…", 1, 2)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSequenceNode") == 2, "the result sequence is being filled"
    controller.apply(model)  # the button says Cancel
    assert state["segment"].status == "cancelled"
    assert [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())
            if scene.GetNthNode(i).GetID() not in ids] == []
    assert browser.GetNumberOfSynchronizedSequenceNodes() == 0
    assert list(tmp_path.iterdir()) == []
    controller.apply(model)
    seg = None
    for _ in range(6000):
        seg = controller.tick()
        if seg is not None or state["segment"].status in (DONE, FAILED):
            break
        time.sleep(0.05)
    assert state["segment"].status == DONE, state["segment"].message
    assert params.outputSegmentation is seg and cine_of(scene, seg) is not None
    message = state["segment"].message
    assert message.startswith("Done: 2 frames segmented into a new segmentation sequence, shown frame by frame in "
                              "'cine segmentation'; the segments' volumes per frame are in the table "
                              "'cine segment volumes per frame'.")
    assert "left ventricle ejection fraction" in message
    assert browser.GetSequenceNode(seg).GetNumberOfDataNodes() == 2 and list(tmp_path.iterdir()) == []


def test_each_corrected_frame_of_a_cine_is_its_own_fine_tuning_case(scene, bridge, tmp_path: Path) -> None:
    """Fine-tune from the scene on a cine: 'Add case' on frame 1 and again on frame 2 of the same proxy volume and
    synchronised segmentation gives two cases, each written with its own frame's voxels and segments (until session
    16 the second was taken for the first, and the one case was written at whatever frame was shown at the start)."""
    from DSDSegmentationLib.bridge.controllers import FinetuneController
    from DSDSegmentationLib.engine.cards import read_model_card
    from DSDSegmentationLib.engine.io import load_volume

    sequence, browser, proxy = cine(scene, bridge)
    model = builtin_models_dir() / "cardiac-dsd"
    run = bridge.start([proxy], model, device="cpu", all_frames=True)
    wait(run)
    seg = bridge.finish(run)
    params = type("Params", (), dict(PARAMETERS))()
    params.finetuneVolume, params.finetuneSegmentation = proxy, seg
    controller = FinetuneController(bridge, ProcessingState(), params, lambda: tmp_path / "work")
    expected = []
    for item in (0, 1):
        browser.SetSelectedItemNumber(item)
        controller.add_case()
        controller.add_case()  # the same frame twice is one case
        expected.append((slicer.util.arrayFromVolume(proxy).copy(), {
            seg.GetSegmentation().GetNthSegment(j).GetName(): segment_array(seg, seg.GetSegmentation().GetNthSegmentID(j),
                                                                           proxy) > 0 for j in range(3)}))
    assert len(controller.cases) == 2
    model_entry = {"card": read_model_card(model)}
    rows = controller.case_rows(model_entry)
    assert [r[0] for r in rows] == ["cine frame 1 (time 0 ms)", "cine frame 2 (time 352 ms)"]
    assert all("left ventricle cavity → left ventricle cavity" in r[2] for r in rows)
    assert browser.GetSelectedItemNumber() == 1, "the rows were read at their frames and the frame shown restored"
    built = bridge.build_finetune_dataset(controller.scene_cases(), model_entry["card"]["preset"], tmp_path / "dataset")
    assert browser.GetSelectedItemNumber() == 1
    assert [c["volume"] for c in built["cases"]] == ["cine frame 1 (time 0 ms)", "cine frame 2 (time 352 ms)"]
    for i, (voxels, segments) in enumerate(expected):
        image, _ = load_volume(tmp_path / "dataset" / "imagesTr" / f"case_{i + 1:03d}.nrrd")
        label, _ = load_volume(tmp_path / "dataset" / "labelsTr" / f"case_{i + 1:03d}.nrrd")
        assert np.array_equal(image.transpose(2, 1, 0), voxels), f"case {i + 1}: its own frame's voxels"
        for value, name in ((1, "right ventricle cavity"), (2, "left ventricle myocardium"), (3, "left ventricle cavity")):
            assert np.array_equal(label.transpose(2, 1, 0) == value, segments[name]), (i, name)
    assert not np.array_equal(expected[0][0], expected[1][0])
