"""The MRML bridge on a real scene (slicer-core): volume node → worker → segmentation node."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")


from DSDSegmentationLib.worker.cli import main as cli  # noqa: E402
from DSDSegmentationLib.engine.cards import read_model_card  # noqa: E402
from DSDSegmentationLib.engine.errors import InputError  # noqa: E402
from DSDSegmentationLib.engine.terminology import CONTEXT_NAME, tag_string  # noqa: E402
from DSDSegmentationLib.bridge.logic import SegmentationBridge  # noqa: E402
from conftest import lazy_predictor as Predictor  # noqa: E402
from DSDSegmentationLib.bridge.terminology import load_terminology_context, loaded_terminology_names  # noqa: E402


@pytest.fixture
def make_logic(scene):
    """Logic factory whose warm workers are stopped after the test."""
    made = []

    def make(**kw):
        made.append(SegmentationBridge(scene, **kw))
        return made[-1]

    yield make
    for logic in made:
        logic.shutdown()


@pytest.fixture(scope="module")
def model(hippocampus_dir: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logic") / "run"
    assert cli(["train", "--task", "hippocampus", "--data", str(hippocampus_dir), "--output", str(out), "--epochs", "1",
                "--max-cases", "6", "--max-steps", "4", "--progress", "none"]) == 0
    return out


def check_terminology(seg, preset: dict) -> None:
    """Every segment carries the card's codes, and Slicer's Terminologies logic, with the shipped custom context
    loaded, resolves each tag to that context's entry whose recommended colour is the segment's colour."""
    terms = slicer.vtkSlicerTerminologiesModuleLogic()
    assert load_terminology_context(terms) == CONTEXT_NAME
    assert load_terminology_context(terms) == CONTEXT_NAME  # the panel's second call (after startup's) loads nothing
    assert loaded_terminology_names(terms).count(CONTEXT_NAME) == 1
    segmentation = seg.GetSegmentation()
    for value, entry in preset["terminology"].items():
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(preset["labels"][value]))
        tag = segment.GetTerminology()
        assert tag == tag_string(entry)
        parsed = slicer.vtkSlicerTerminologyEntry()
        assert terms.DeserializeTerminologyEntry(tag, parsed)
        assert parsed.GetTypeObject().GetCodeValue() == entry["type"].split("^")[1]
        assert terms.UpdateEntryFromLoadedTerminologies(parsed, [CONTEXT_NAME], [])
        leaf = parsed.GetTypeModifierObject() if entry.get("type_modifier") else parsed.GetTypeObject()
        assert leaf.GetCodeValue() == (entry.get("type_modifier") or entry["type"]).split("^")[1]
        np.testing.assert_allclose(np.array(leaf.GetRecommendedDisplayRGBValue()) / 255.0, segment.GetColor(), atol=1 / 255)


def oblique_volume(scene, hippocampus_dir: Path):
    """A real hippocampus image as a volume node with an oblique, non-identity IJKToRAS."""
    data = np.asanyarray(nib.load(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz").dataobj).astype(np.float32)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "T1 oblique")
    a = math.radians(30)
    m = np.array([[math.cos(a), -math.sin(a), 0, -10], [math.sin(a), math.cos(a), 0, 20], [0, 0, 1, 5], [0, 0, 0, 1]])
    m[:3, :3] = m[:3, :3] @ np.diag([1.0, 1.2, 0.8])
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(data.transpose(2, 1, 0)))  # KJI
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
    return node, data, m


def test_segment_oblique_volume_matches_engine(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    vol, data, ijk_to_ras = oblique_volume(scene, hippocampus_dir)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateFolderItem(sh.GetSceneItemID(), "study A")
    sh.CreateItem(study, vol)
    logic = make_logic(temp_root=tmp_path)
    seg = logic.segment([vol], model, device="cpu")
    segmentation = seg.GetSegmentation()
    names = [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
    assert sorted(names) == ["anterior hippocampus", "posterior hippocampus"]
    sid = segmentation.GetSegmentIdBySegmentName("posterior hippocampus")
    color = segmentation.GetSegment(sid).GetColor()
    np.testing.assert_allclose(color, np.array([70, 130, 220]) / 255.0, atol=1 / 255)
    check_terminology(seg, read_model_card(model)["preset"])
    assert list(tmp_path.iterdir()) == [], "temporary files must be removed"
    assert seg.GetSegmentation().ContainsRepresentation("Closed surface")
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study, "placed beside the input volume"
    # the same image, segmented by the engine outside MRML: written as the bridge writes it, whose header must hold
    # the node's geometry (IJKToRAS as the voxel-to-RAS affine; a NIfTI's float32 sform would round the oblique
    # matrix, and with the preset's resampling even such rounding flips a few near-tie voxels of this 1-epoch model)
    from DSDSegmentationLib.engine.io import load_volume

    ref_in = logic.write_volume(vol, tmp_path / "ref.nrrd")
    ref_data, ref_affine = load_volume(str(ref_in))
    np.testing.assert_allclose(ref_affine, ijk_to_ras, atol=1e-9)
    np.testing.assert_array_equal(ref_data, data)
    labels, _ = Predictor(model, device="cpu").predict([str(ref_in)])
    for value, name in ((1, "anterior hippocampus"), (2, "posterior hippocampus")):
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetSegmentIdBySegmentName(name), vol)
        expected = (labels == value).transpose(2, 1, 0)
        assert arr.shape == expected.shape
        assert np.array_equal(arr > 0, expected), f"{name}: {(arr > 0).sum()} vs {expected.sum()} voxels"


def test_folders_with_spaces_and_accents(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    """A user's Slicer keeps its temporary directory under their home ('C:/Users/José Müller/AppData/...') and models
    in a shared folder with spaces and accents: the volume goes to the worker, the model loads and the labels come
    back as they do from plain ASCII folders, and nothing is left in the temporary folder."""
    import shutil

    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    temp = tmp_path / "Temp José Müller" / "Slicer 5.10"
    temp.mkdir(parents=True)
    shared = tmp_path / "Modèles partagés" / "hippocampe (essai)"
    shutil.copytree(model, shared)
    (tmp_path / "ascii").mkdir()
    plain = make_logic(temp_root=tmp_path / "ascii").segment([vol], model, device="cpu")
    accented = make_logic(temp_root=temp).segment([vol], shared, device="cpu")
    for name in ("anterior hippocampus", "posterior hippocampus"):
        a, b = (slicer.util.arrayFromSegmentBinaryLabelmap(s, s.GetSegmentation().GetSegmentIdBySegmentName(name), vol)
                for s in (plain, accented))
        assert a.any() and np.array_equal(a, b), name
    assert list(temp.iterdir()) == [], "temporary files must be removed"


def test_seg_nrrd_round_trip(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    seg = make_logic().segment([vol], model, device="cpu")
    path = tmp_path / "out.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(seg)
    back = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert storage.ReadData(back)
    for name in ("anterior hippocampus", "posterior hippocampus"):
        a = slicer.util.arrayFromSegmentBinaryLabelmap(seg, seg.GetSegmentation().GetSegmentIdBySegmentName(name), vol)
        b = slicer.util.arrayFromSegmentBinaryLabelmap(back, back.GetSegmentation().GetSegmentIdBySegmentName(name), vol)
        assert np.array_equal(a, b)
        sa = seg.GetSegmentation().GetSegment(seg.GetSegmentation().GetSegmentIdBySegmentName(name))
        sb = back.GetSegmentation().GetSegment(back.GetSegmentation().GetSegmentIdBySegmentName(name))
        assert sb.GetTerminology() == sa.GetTerminology() != ""


def test_cancel_leaves_no_node_process_or_files(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    logic = make_logic(temp_root=tmp_path)
    n_nodes = scene.GetNumberOfNodes()
    run = logic.start([vol], model, device="cpu", tta=True)
    time.sleep(0.5)
    pid = logic.server.proc.proc.pid
    t0 = time.perf_counter()
    logic.cancel(run)
    assert time.perf_counter() - t0 < 10, "a cancel is answered between two sliding-window batches"
    assert run.worker.result().status == "cancelled"
    assert any(r.get("stage") == "cancelled" for r in run.worker.records), "the worker itself confirmed the cancel"
    os.kill(pid, 0)  # the warm worker (and its loaded model) is still there
    assert list(tmp_path.iterdir()) == []
    assert scene.GetNumberOfNodes() == n_nodes
    assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()
    # the next run reuses the same warm worker: no cold start after a cancel
    seg = logic.segment([vol], model, device="cpu")
    assert seg.GetSegmentation().GetNumberOfSegments() == 2 and logic.server.proc.proc.pid == pid


@pytest.mark.parametrize("cancelled", ["first", "second"])
def test_one_cancel_stops_only_its_own_job(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path,
                                           cancelled: str) -> None:
    """Apply runs while a click starts on the same warm worker: cancelling one never ends the other."""
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    logic = make_logic(temp_root=tmp_path)
    first = logic.start([vol], model, device="cpu", tta=True)
    second = logic.start([vol], model, device="cpu")
    pid = logic.server.proc.proc.pid
    stop, keep = (first, second) if cancelled == "first" else (second, first)
    time.sleep(0.3)
    logic.cancel(stop)
    assert stop.worker.result().status == "cancelled"
    if cancelled == "second":
        # a request still in the queue is answered at once, while the one before it runs (before: only after
        # it, so a run longer than the client's cancel timeout got the worker, and with it that run, killed)
        assert keep.worker.running, "the queued request's cancel was answered only after the running one ended"
    seg = logic.finish(keep)
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    assert logic.server.proc.proc.pid == pid
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("warm", [True, False])
def test_warm_and_one_shot_workers_agree(scene, model: Path, hippocampus_dir: Path, warm: bool) -> None:
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    logic = SegmentationBridge(scene, warm=warm)
    try:
        assert logic.environment() is None  # nothing started yet
        first = logic.segment([vol], model, device="cpu")
        pid = logic.server.proc.proc.pid if warm else None
        if warm:  # the panel's environment line comes from the worker: Slicer's own process never imports torch
            import torch

            cuda = torch.version.cuda or "none (CPU build)"  # PyPI's torch on Python 3.12 is a CUDA build
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
            assert logic.environment() == f"torch {torch.__version__}, CUDA build {cuda}, device {device}"
        else:
            assert logic.environment() is None
        second = logic.segment([vol], model, device="cpu")
        if warm:
            assert logic.server.proc.proc.pid == pid, "the warm worker is reused"
        name = "anterior hippocampus"
        a, b = (slicer.util.arrayFromSegmentBinaryLabelmap(s, s.GetSegmentation().GetSegmentIdBySegmentName(name), vol)
                for s in (first, second))
        assert np.array_equal(a, b) and a.any()
    finally:
        logic.shutdown()
    if warm:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_bad_inputs(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    logic = make_logic(temp_root=tmp_path)
    with pytest.raises(InputError, match=r"needs 1 input volume\(s\) \(T1 MRI\), 2 given"):
        logic.start([vol, vol], model)
    vec = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vec, np.zeros((4, 5, 6, 3), np.uint8))
    with pytest.raises(InputError, match="3-component .* not supported; a time series \\(a cine\\) loaded as a sequence is segmented frame by frame"):
        logic.start([vec], model)
    with pytest.raises(InputError, match="does not exist"):
        logic.start([vol], tmp_path / "no_model")
    two = {"preset": {"channels": ["FLAIR", "T1c"]}}  # a two-sequence model's card: one volume picked twice
    with pytest.raises(InputError, match=r"inputs 'FLAIR' and 'T1c' are the same volume \(.*\); pick each sequence once"):
        logic.check_inputs([vol, vol], two)
    other, _, _ = oblique_volume(scene, hippocampus_dir)
    logic.check_inputs([vol, other], two)  # two different volumes pass
    flat = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "flat")
    slicer.util.updateVolumeFromArray(flat, np.full((10, 12, 14), 5.0, np.float32))
    with pytest.raises(InputError, match="constant intensity"):
        logic.segment([flat], model, device="cpu")
    pkg = tmp_path.parent / (tmp_path.name + "_pkg")
    assert cli(["export", "--model", str(model), "--output", str(pkg)]) == 0
    (pkg / "weights.pt").unlink()
    with pytest.raises(InputError, match="weights.pt is missing"):  # checked before any worker starts
        logic.segment([vol], pkg, device="cpu")
    assert list(tmp_path.iterdir()) == []
    assert not scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems()


def test_offscreen_renders_show_the_segments(scene, make_logic, model: Path, hippocampus_dir: Path, tmp_path: Path) -> None:
    from DSDSegmentationLib.bridge.rendering import render_3d, render_slice

    app = slicer.modules.volumes.logic().GetMRMLApplicationLogic()
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    vol.CreateDefaultDisplayNodes()
    seg = make_logic().segment([vol], model, device="cpu")
    out = Path(os.environ.get("DSDSEG_RENDER_DIR", tmp_path))
    p3 = render_3d(scene, app, seg, out / "surfaces_3d.png")
    p2 = render_slice(scene, app, vol, seg, out / "slice_outline.png")
    import vtk

    for p, min_pixels in ((p3, 500), (p2, 50)):
        reader = vtk.vtkPNGReader()
        reader.SetFileName(str(p))
        reader.Update()
        from vtkmodules.util.numpy_support import vtk_to_numpy

        img = vtk_to_numpy(reader.GetOutput().GetPointData().GetScalars())[:, :3].astype(int)
        # pixels close to the posterior hippocampus colour (70, 130, 220): bluish, not grey
        blue = (img[:, 2] - img[:, 0] > 60) & (img[:, 2] > 120)
        assert blue.sum() > min_pixels, f"{p.name}: only {blue.sum()} segment-coloured pixels"


def test_a_new_result_never_replaces_a_segment_the_user_edited(scene, hippocampus_dir: Path, tmp_path: Path) -> None:
    """Apply into a segmentation that already holds the model's segments: unchanged results are replaced; one the
    user edited in the meantime (or made themselves under a model's name) is kept, renamed '<name> (edited)', and
    the run's notes say so. The mark that tells them apart survives a .seg.nrrd round trip."""
    from DSDSegmentationLib.bridge.demo import default_model
    from DSDSegmentationLib.bridge.logic import is_unchanged_result
    from DSDSegmentationLib.engine.cards import read_model_card

    preset = read_model_card(default_model())["preset"]
    bridge = SegmentationBridge(scene, warm=False)
    image, label = (hippocampus_dir / d / "hippocampus_003.nii.gz" for d in ("imagesTr", "labelsTr"))
    vol = bridge.load_volume(image)
    truth = np.asanyarray(nib.load(label).dataobj).transpose(2, 1, 0)  # KJI, as slicer.util arrays
    seg = bridge.import_labelmap(label, vol, preset, show_3d=False)
    segmentation = seg.GetSegmentation()

    def segment(name):
        return segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(name))

    def voxels(node, name):
        s = node.GetSegmentation()
        return slicer.util.arrayFromSegmentBinaryLabelmap(node, s.GetSegmentIdBySegmentName(name), vol)

    def names(node):
        s = node.GetSegmentation()
        return sorted(s.GetNthSegment(i).GetName() for i in range(s.GetNumberOfSegments()))

    assert all(is_unchanged_result(segment(n)) for n in ("anterior hippocampus", "posterior hippocampus"))
    storage = slicer.vtkMRMLSegmentationStorageNode()  # saved and loaded again: still the model's own result
    storage.SetFileName(str(tmp_path / "result.seg.nrrd"))
    assert storage.WriteData(seg)
    back = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    assert storage.ReadData(back)
    assert all(is_unchanged_result(back.GetSegmentation().GetSegment(back.GetSegmentation().GetSegmentIdBySegmentName(n)))
               for n in ("anterior hippocampus", "posterior hippocampus"))

    notes: list[str] = []
    bridge.import_labelmap(label, vol, preset, segmentation_node=seg, show_3d=False, notes=notes)
    assert notes == [] and names(seg) == ["anterior hippocampus", "posterior hippocampus"]

    edited = voxels(seg, "anterior hippocampus")  # the user erases one slice of it in Segment Editor
    k = int(np.argwhere(edited)[0][0])
    edited[k] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, seg, segmentation.GetSegmentIdBySegmentName("anterior hippocampus"), vol)
    assert not is_unchanged_result(segment("anterior hippocampus")) and is_unchanged_result(segment("posterior hippocampus"))
    bridge.import_labelmap(label, vol, preset, segmentation_node=seg, show_3d=False, notes=notes)
    assert names(seg) == ["anterior hippocampus", "anterior hippocampus (edited)", "posterior hippocampus"]
    assert notes == ["your edited segment 'anterior hippocampus' was kept as 'anterior hippocampus (edited)'"]
    assert np.array_equal(voxels(seg, "anterior hippocampus (edited)"), edited)
    assert np.array_equal(voxels(seg, "anterior hippocampus") > 0, truth == 1)
    assert np.array_equal(voxels(seg, "posterior hippocampus") > 0, truth == 2)

    mine = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn by hand")  # the user's own, a model's name
    mine.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    sid = mine.GetSegmentation().AddEmptySegment("", "posterior hippocampus", [1.0, 0.0, 0.0])
    slicer.util.updateSegmentBinaryLabelmapFromArray((truth == 2).astype(np.uint8), mine, sid, vol)
    notes.clear()
    bridge.import_labelmap(label, vol, preset, segmentation_node=mine, show_3d=False, notes=notes)
    assert names(mine) == ["anterior hippocampus", "posterior hippocampus", "posterior hippocampus (edited)"]
    assert notes == ["your edited segment 'posterior hippocampus' was kept as 'posterior hippocampus (edited)'"]


def test_no_operation_leaves_nodes_behind_in_the_users_scene(scene, hippocampus_dir: Path, tmp_path: Path) -> None:
    """Slicer's array helpers and a labelmap import / export through a temporary volume each leave that volume's
    display node (export: a colour table too) in the scene; MRML never removes them, so every Apply, click, Compare
    and fine-tune case added hidden nodes to the user's scene (and to the saved .mrml) until session 12."""
    from DSDSegmentationLib.bridge.demo import default_model
    from DSDSegmentationLib.bridge.logic import segment_array, set_segment_array
    from DSDSegmentationLib.engine.cards import read_model_card

    preset = read_model_card(default_model())["preset"]
    bridge = SegmentationBridge(scene, warm=False)
    image, label = (hippocampus_dir / d / "hippocampus_003.nii.gz" for d in ("imagesTr", "labelsTr"))
    vol = bridge.load_volume(image)

    def ids():
        return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())}

    before = ids()
    seg = bridge.import_labelmap(label, vol, preset, show_3d=False)
    added = {k: v for k, v in ids().items() if k not in before}
    assert sorted(added.values()) == ["vtkMRMLSegmentationDisplayNode", "vtkMRMLSegmentationNode"], added
    before = ids()
    bridge.import_labelmap(label, vol, preset, segmentation_node=seg, show_3d=False)  # Apply again
    bridge.export_labelmap(seg, vol, preset, tmp_path / "case.nii.gz")  # a fine-tune case
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("anterior hippocampus")
    voxels = segment_array(seg, sid, vol)  # a click, a Compare
    assert voxels.any()
    set_segment_array(voxels, seg, sid, vol)
    assert ids() == before
    # and the helpers do what Slicer's do
    assert np.array_equal(voxels, slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol))


def test_an_output_segmentation_removed_during_apply_does_not_swallow_the_result(scene, model: Path,
                                                                                   hippocampus_dir: Path) -> None:
    """The user deletes the chosen output segmentation while the worker runs: until session 12 the result went into
    that removed node (and the Done message named it), i.e. it was lost. Now it goes into a new segmentation in the
    scene and the notes say so."""
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    bridge = SegmentationBridge(scene, warm=False)
    out = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "my output")
    run = bridge.start([vol], model, device="cpu", segmentation_node=out)
    scene.RemoveNode(out)
    seg = bridge.finish(run)
    assert seg is not out and scene.IsNodePresent(seg) and seg.GetSegmentation().GetNumberOfSegments() == 2
    assert run.notes == ["the output segmentation 'my output' was removed meanwhile; the result is in a new segmentation"]


def test_an_input_volume_removed_during_apply_adds_nothing(scene, hippocampus_dir: Path, tmp_path: Path) -> None:
    """The user deletes the input volume while the worker runs (Apply or a click): the result has nothing to lie on,
    so nothing is added (no segmentation for a volume that is gone), the message says why, no file is left."""
    from DSDSegmentationLib.bridge.demo import default_model
    from DSDSegmentationLib.bridge.interactive import InteractiveLogic

    model = default_model()  # the shipped one: no training in this process (runs in Slicer's Python lane too)

    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    bridge = SegmentationBridge(scene, warm=False, temp_root=tmp_path)
    segmentations = scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")
    run = bridge.start([vol], model, device="cpu")
    scene.RemoveNode(vol)
    with pytest.raises(InputError, match="the input volume 'T1 oblique' was removed from the scene while segmenting; "
                                         "nothing was added"):
        bridge.finish(run)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations and not list(tmp_path.iterdir())
    vol, _, _ = oblique_volume(scene, hippocampus_dir)
    logic = InteractiveLogic(bridge)
    bounds = [0.0] * 6
    vol.GetRASBounds(bounds)
    region = logic.start(vol, model, [(bounds[0] + bounds[1]) / 2, (bounds[2] + bounds[3]) / 2, (bounds[4] + bounds[5]) / 2])
    scene.RemoveNode(vol)
    with pytest.raises(InputError, match="was removed from the scene while segmenting"):
        logic.finish(region)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations and not list(tmp_path.iterdir())
    assert not [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())
                if scene.GetNthNode(i).GetName().endswith(" region")], "the crops are removed too"
