"""Boundary QA on a real MRML scene (slicer-core): table, outlines, distance-coloured surfaces, worst errors,
uncertainty overlay — on analytic shapes with known offsets and an anisotropic, oblique volume."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")

import vtk  # noqa: E402
from vtkmodules.util.numpy_support import vtk_to_numpy  # noqa: E402

from DSDSegmentationLib.engine.metrics import class_metrics  # noqa: E402
from DSDSegmentationLib.bridge.qa_logic import PRED_OUTLINE, QALogic  # noqa: E402

SPACING_KJI = (2.0, 0.8, 1.0)  # slices 2 mm apart


def make_volume(scene, shape=(40, 60, 60)):
    vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "image")
    slicer.util.updateVolumeFromArray(vol, np.zeros(shape, np.float32))
    a = math.radians(20)
    m = np.array([[math.cos(a), -math.sin(a), 0, 5], [math.sin(a), math.cos(a), 0, -3], [0, 0, 1, 10], [0, 0, 0, 1]])
    m[:3, :3] = m[:3, :3] @ np.diag([SPACING_KJI[2], SPACING_KJI[1], SPACING_KJI[0]])
    vol.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
    return vol


def ball(shape, center_mm, radius_mm):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING_KJI)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, center_mm)) <= radius_mm**2


def segmentation(scene, vol, name, masks):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(vol)
    for seg_name, mask in masks.items():
        sid = node.GetSegmentation().AddEmptySegment(seg_name, seg_name)
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask.astype(np.uint8), node, sid, vol)
    return node


def test_compare_on_spheres_with_a_bump(scene) -> None:
    vol = make_volume(scene)
    shape = (40, 60, 60)
    centre = (40.0, 24.0, 30.0)
    ref = ball(shape, centre, 10.0)
    pred = ball(shape, centre, 12.0) | ball(shape, (40.0, 24.0, 44.0), 4.0)  # 2 mm too big, plus a bump ~6 mm out
    seg = segmentation(scene, vol, "model", {"lesion": pred})
    refn = segmentation(scene, vol, "manual", {"lesion": ref})
    result = QALogic(scene).compare(seg, refn, vol, tolerance_mm=1.0, worst=3)
    # metrics: the engine's, on the volume's grid, in mm
    expected = class_metrics(pred, ref, SPACING_KJI, 1.0)
    t = result.table.GetTable()
    assert t.GetValue(0, 0).ToString() == "lesion"
    assert t.GetValue(0, 1).ToDouble() == pytest.approx(expected["dice"], abs=1e-6)
    assert t.GetValue(0, 2).ToDouble() == pytest.approx(expected["hd95"], abs=1e-6)
    assert t.GetValue(0, 4).ToDouble() == pytest.approx(expected["surface_dice"], abs=1e-6)
    assert t.GetValue(0, 7).ToDouble() > 0  # too big
    # distance-coloured surface: about +2 mm over most of the sphere, the bump up to ~6 mm, never far inside
    d = vtk_to_numpy(result.models["lesion"].GetPolyData().GetPointData().GetArray("Distance"))
    assert np.median(d) == pytest.approx(2.0, abs=0.8)
    assert d.max() > 4.5 and d.min() > -1.5
    assert result.models["lesion"].GetDisplayNode().GetActiveScalarName() == "Distance"
    # worst errors: the first one sits on the bump (in RAS, through the oblique geometry)
    assert 1 <= result.markups.GetNumberOfControlPoints() <= 3
    first = result.errors[0]
    assert first["kind"] == "extra" and first["distance_mm"] > 4.0
    assert first["ijk"][2] * SPACING_KJI[2] > 44.0  # on the bump's side (column axis)
    pos = [0.0, 0.0, 0.0]
    result.markups.GetNthControlPointPosition(0, pos)
    np.testing.assert_allclose(pos, first["ras"], atol=1e-6)
    assert "lesion" in result.markups.GetNthControlPointDescription(0)
    # outlines in contrasting colours, no fill
    d0 = seg.GetDisplayNode()
    assert d0.GetVisibility2DOutline() and not d0.GetVisibility2DFill()
    sid = seg.GetSegmentation().GetNthSegmentID(0)
    assert tuple(round(c, 3) for c in d0.GetSegmentOverrideColor(sid)) == PRED_OUTLINE


def test_missing_segment_and_no_common_names(scene) -> None:
    from DSDSegmentationLib.engine.errors import InputError

    vol = make_volume(scene)
    shape = (40, 60, 60)
    a = segmentation(scene, vol, "a", {"x": ball(shape, (40.0, 24.0, 30.0), 8.0)})
    b = segmentation(scene, vol, "b", {"y": ball(shape, (40.0, 24.0, 30.0), 8.0)})
    with pytest.raises(InputError, match="no segment names in common"):
        QALogic(scene).compare(a, b, vol)


def test_uncertainty_overlay_scores_segments(scene, tmp_path: Path) -> None:
    vol = make_volume(scene)
    shape = (40, 60, 60)
    calm = ball(shape, (40.0, 24.0, 20.0), 6.0)
    doubtful = ball(shape, (40.0, 24.0, 45.0), 6.0)
    seg = segmentation(scene, vol, "model", {"calm": calm, "doubtful": doubtful})
    unc = np.zeros(shape, np.float32)
    unc[ball(shape, (40.0, 24.0, 45.0), 8.0)] = 0.8
    matrix = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(matrix)
    m = slicer.util.arrayFromVTKMatrix(matrix)
    nib.save(nib.Nifti1Image(unc.transpose(2, 1, 0), m), tmp_path / "unc.nii.gz")
    node, table = QALogic(scene).uncertainty_overlay(tmp_path / "unc.nii.gz", seg, vol, {0: "bg", 1: "calm", 2: "doubtful"})
    t = table.GetTable()
    assert t.GetValue(0, 0).ToString() == "doubtful" and t.GetValue(0, 1).ToDouble() > 0.5
    assert t.GetValue(1, 0).ToString() == "calm" and t.GetValue(1, 1).ToDouble() < 0.05


def test_segment_with_uncertainty_overlay(scene) -> None:
    from DSDSegmentationLib.bridge.demo import default_model, default_sample
    from DSDSegmentationLib.bridge.logic import SegmentationBridge

    logic = SegmentationBridge(scene, warm=True)
    try:
        vol = logic.load_volume(default_sample() / "imagesTr" / "hippocampus_040.nii.gz")
        run = logic.start([vol], default_model(), device="cpu", tta=True, uncertainty=True)
        seg = logic.finish(run)
    finally:
        logic.shutdown()
    assert seg.GetSegmentation().GetNumberOfSegments() == 2
    unc = slicer.util.arrayFromVolume(run.uncertainty_node)
    assert unc.shape == slicer.util.arrayFromVolume(vol).shape and 0 <= unc.min() and unc.max() <= 1
    t = run.uncertainty_table.GetTable()
    assert t.GetNumberOfRows() == 2 and 0 < t.GetValue(0, 1).ToDouble() < 1
    assert not run.temp_dir.exists()


def test_restore_display_shows_the_segmentations_as_before_compare(scene) -> None:
    """Compare shows both segmentations as yellow / cyan outlines; Restore display (and the next Compare) puts back
    how the user showed them: fill, outline, thickness, visibility and their own override colours."""
    from types import SimpleNamespace

    import time

    from DSDSegmentationLib.bridge.controllers import QA, ProcessingState, QAController

    vol = make_volume(scene)
    shape = (40, 60, 60)
    masks = {"lesion": ball(shape, (40.0, 24.0, 30.0), 10.0), "core": ball(shape, (40.0, 24.0, 30.0), 4.0)}
    seg = segmentation(scene, vol, "model", masks)
    refn = segmentation(scene, vol, "manual", {"lesion": ball(shape, (40.0, 24.0, 32.0), 10.0)})
    d, r = seg.GetDisplayNode(), refn.GetDisplayNode()
    core = seg.GetSegmentation().GetSegmentIdBySegmentName("core")
    lesion = seg.GetSegmentation().GetSegmentIdBySegmentName("lesion")
    d.SetSegmentOverrideColor(core, 0.2, 0.4, 0.6)  # the user's own override on one segment
    d.SetSliceIntersectionThickness(3)
    r.SetVisibility(False)

    def state(node):
        dn = node.GetDisplayNode()
        s = node.GetSegmentation()
        return (dn.GetVisibility(), dn.GetVisibility2DFill(), dn.GetVisibility2DOutline(), dn.GetSliceIntersectionThickness(),
                [tuple(round(c, 6) for c in dn.GetSegmentOverrideColor(s.GetNthSegmentID(i))) for i in range(s.GetNumberOfSegments())])

    before = (state(seg), state(refn))
    params = SimpleNamespace(qaSegmentation=seg, qaReference=refn, qaVolume=vol, qaToleranceMm=1.0)
    qa = QAController(scene, ProcessingState(), params)

    def compare():
        qa.compare()
        while qa.tick() is None:
            assert qa.run is not None, qa.state[QA].message
            time.sleep(0.02)

    assert not qa.restore_display()  # nothing compared yet
    compare()
    assert (state(seg), state(refn)) != before
    assert not d.GetVisibility2DFill() and r.GetVisibility()
    assert tuple(round(c, 3) for c in d.GetSegmentOverrideColor(core)) == PRED_OUTLINE
    compare()  # a second Compare saves the user's state, not the QA look
    assert qa.restore_display()
    assert (state(seg), state(refn)) == before
    assert d.GetSegmentOverrideColor(lesion)[0] < 0  # no override, as before
    assert not qa.restore_display()  # once
    assert qa.result.table is not None and scene.IsNodePresent(qa.result.markups)  # the QA results stay


def test_an_empty_segment_is_reported_not_refused(scene) -> None:
    """A segment the model left empty (or one empty on both sides) is a result to show, not an error: Dice 0 and no
    distances for it, a 'whole segment missed' point at the reference's centre, no surface; the other segments as
    usual. (Until session 12 the main-thread Compare stopped with 'no surface (empty segment)'.)"""
    vol = make_volume(scene)
    shape = (40, 60, 60)
    lesion, core = ball(shape, (40.0, 24.0, 30.0), 8.0), ball(shape, (40.0, 24.0, 30.0), 3.0)
    empty = np.zeros(shape, bool)
    seg = segmentation(scene, vol, "model", {"lesion": lesion, "core": empty, "nothing": empty})
    ref = segmentation(scene, vol, "manual", {"lesion": np.roll(lesion, 1, 2), "core": core, "nothing": empty})
    result = QALogic(scene).compare(seg, ref, vol)
    assert result.metrics["core"]["dice"] == 0.0 and result.metrics["core"]["hd95"] is None
    assert result.metrics["core"]["empty"] == "prediction"
    assert result.metrics["nothing"]["empty"] == "both" and result.metrics["nothing"]["dice"] == 1.0
    assert result.metrics["lesion"]["dice"] > 0.8
    assert set(result.models) == {"lesion"}
    missed = [e for e in result.errors if e["segment"] == "core"]
    assert missed and missed[0]["distance_mm"] is None
    assert "whole segment missed" in result.markups.GetNthControlPointDescription(result.errors.index(missed[0]))
    t = result.table.GetTable()
    rows = {t.GetValue(i, 0).ToString(): i for i in range(t.GetNumberOfRows())}
    assert math.isnan(t.GetValue(rows["core"], 2).ToDouble())  # HD95 undefined: NaN in the table


def test_a_volume_the_segments_do_not_lie_on_is_refused(scene) -> None:
    """Picking the wrong volume for QA would read every segment as empty ('both empty': Dice 1): refused, naming
    the segment, its segmentation and the volume."""
    from DSDSegmentationLib.engine.errors import InputError

    vol = make_volume(scene)
    shape = (40, 60, 60)
    seg = segmentation(scene, vol, "model", {"lesion": ball(shape, (40.0, 24.0, 30.0), 8.0)})
    ref = segmentation(scene, vol, "manual", {"lesion": ball(shape, (40.0, 24.0, 31.0), 8.0)})
    elsewhere = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "other scan")
    slicer.util.updateVolumeFromArray(elsewhere, np.zeros((10, 10, 10), np.float32))
    elsewhere.SetOrigin(500.0, 500.0, 500.0)
    with pytest.raises(InputError, match="'lesion' of 'model' lies outside the volume 'other scan'"):
        QALogic(scene).compare(seg, ref, elsewhere)


def test_a_segmentation_removed_while_comparing_is_reported(scene) -> None:
    """Compare runs in the worker; if the user deletes one of the nodes meanwhile, the result is not shown on a
    node that is gone: a clear error, nothing added, the files removed."""
    from DSDSegmentationLib.engine.errors import InputError

    vol = make_volume(scene)
    shape = (40, 60, 60)
    seg = segmentation(scene, vol, "model", {"lesion": ball(shape, (40.0, 24.0, 30.0), 8.0)})
    ref = segmentation(scene, vol, "manual", {"lesion": ball(shape, (40.0, 24.0, 31.0), 8.0)})
    logic = QALogic(scene)
    run = logic.start_compare(seg, ref, vol)
    scene.RemoveNode(ref)
    nodes = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="'manual' was removed from the scene while comparing"):
        logic.finish_compare(run)
    assert scene.GetNumberOfNodes() == nodes and not run.folder.exists()
