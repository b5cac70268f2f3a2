"""Click prompts on a real MRML scene: a real MSD hippocampus case embedded in a larger, oblique volume."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")

from DSDSegmentationLib.bridge.demo import default_model, default_sample  # noqa: E402
from DSDSegmentationLib.engine.cards import read_model_card  # noqa: E402
from DSDSegmentationLib.engine.errors import InputError  # noqa: E402
from DSDSegmentationLib.bridge.interactive import InteractiveLogic, _matrix, region_ijk  # noqa: E402
from DSDSegmentationLib.bridge.logic import SegmentationBridge  # noqa: E402
from conftest import lazy_predictor as Predictor  # noqa: E402


BIG = (110, 96, 80)  # i, j, k


@pytest.fixture
def logic(scene):
    bridge = SegmentationBridge(scene, warm=True)
    yield InteractiveLogic(bridge)
    bridge.shutdown()


def embed(scene):
    """Two real cases (015 near the +i side, 040 near the -i side) in a larger volume with an oblique IJKToRAS.
    Returns the volume node, its IJK array (i, j, k) and each case's offset."""
    rng = np.random.default_rng(0)
    sample = default_sample()
    cases = {}
    for cid in ("hippocampus_015", "hippocampus_040"):
        cases[cid] = (np.asanyarray(nib.load(sample / "imagesTr" / f"{cid}.nii.gz").dataobj).astype(np.float32),
                      np.rint(np.asanyarray(nib.load(sample / "labelsTr" / f"{cid}.nii.gz").dataobj)).astype(np.uint8))
    base = float(np.median(cases["hippocampus_015"][0]))
    big = (base + rng.normal(0, base * 0.1, BIG)).astype(np.float32)
    offsets = {"hippocampus_015": (64, 20, 20), "hippocampus_040": (4, 24, 18)}
    labels = np.zeros(BIG, np.uint8)
    for cid, (img, lab) in cases.items():
        o = offsets[cid]
        sl = tuple(slice(a, a + n) for a, n in zip(o, img.shape))
        big[sl], labels[sl] = img, lab
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "whole head")
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(big.transpose(2, 1, 0)))
    a = math.radians(25)
    m = np.array([[math.cos(a), 0, math.sin(a), -40], [0, 1, 0, 12], [-math.sin(a), 0, math.cos(a), 7], [0, 0, 0, 1]])
    node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(m))
    return node, big, labels, offsets, m


def ras_of(m, ijk):
    return list((m @ np.array([*ijk, 1.0]))[:3])


def centroid(labels, offset, shape=(60, 60, 60)):
    sl = tuple(slice(a, a + n) for a, n in zip(offset, shape))
    idx = np.argwhere(labels[sl] > 0).mean(0)
    return [float(v + o) for v, o in zip(idx, offset)]


def test_click_equals_model_on_the_crop_and_second_side_adds(scene, logic, tmp_path: Path) -> None:
    vol, big, labels, offsets, m = embed(scene)
    click = ras_of(m, centroid(labels, offsets["hippocampus_015"]))
    seg, region = logic.segment_at(vol, default_model(), click, device="cpu")
    assert region.side == "right"  # +i maps to +x (right) here
    lo, hi = region.lo, region.hi
    # the same crop, outside MRML, through the engine
    crop = big[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    aff = m.copy()
    aff[:3, 3] = ras_of(m, lo)
    nib.save(nib.Nifti1Image(crop, aff), tmp_path / "crop.nii.gz")
    expected, _ = Predictor(default_model(), device="cpu").predict([str(tmp_path / "crop.nii.gz")])
    segmentation = seg.GetSegmentation()
    first = {}
    for value, name in ((1, "right anterior hippocampus"), (2, "right posterior hippocampus")):
        sid = segmentation.GetSegmentIdBySegmentName(name)
        assert sid, [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).transpose(2, 1, 0) > 0  # i, j, k
        inside = arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        assert np.array_equal(inside, expected == value)
        outside = arr.copy()
        outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
        assert not outside.any(), "voxels outside the region are untouched"
        first[name] = arr
        tag = segmentation.GetSegment(sid).GetTerminology()
        assert "SCT^5366008^Hippocampus" in tag and tag.endswith("SCT^24028007^Right")
    truth = labels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    dice = 2 * ((expected > 0) & (truth > 0)).sum() / ((expected > 0).sum() + (truth > 0).sum())
    assert dice > 0.7, f"the click region segments the embedded hippocampus (Dice {dice:.3f})"
    # a second click on the other side adds left segments and leaves the right ones as they were
    click2 = ras_of(m, centroid(labels, offsets["hippocampus_040"]))
    seg2, region2 = logic.segment_at(vol, default_model(), click2, segmentation_node=seg, device="cpu")
    assert seg2 is seg and region2.side == "left"
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["left anterior hippocampus", "left posterior hippocampus", "right anterior hippocampus",
                     "right posterior hippocampus"]
    for name, arr in first.items():
        again = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetSegmentIdBySegmentName(name), vol)
        assert np.array_equal(again.transpose(2, 1, 0) > 0, arr)


def test_clicks_near_the_border_and_outside(scene, logic) -> None:
    vol, big, labels, offsets, m = embed(scene)
    seg, region = logic.segment_at(vol, default_model(), ras_of(m, (2, 3, 1)), device="cpu")
    assert region.lo == (0, 0, 0) and all(h <= n for h, n in zip(region.hi, BIG))
    with pytest.raises(InputError, match="outside the volume"):
        logic.start(vol, default_model(), ras_of(m, (-30, 10, 10)))
    assert scene.GetFirstNodeByName("whole head region") is None, "no crop node is left behind"


def test_moved_point_replaces_its_own_earlier_result(scene, logic) -> None:
    vol, big, labels, offsets, m = embed(scene)
    c = centroid(labels, offsets["hippocampus_015"])
    seg, first = logic.segment_at(vol, default_model(), ras_of(m, c), device="cpu")
    moved = logic.start(vol, default_model(), ras_of(m, [c[0], c[1] + 6, c[2]]), segmentation_node=seg, device="cpu")
    logic.finish(moved, previous=first)
    sid = seg.GetSegmentation().GetSegmentIdBySegmentName("right posterior hippocampus")
    arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).transpose(2, 1, 0) > 0
    lo, hi = moved.lo, moved.hi
    outside = arr.copy()
    outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    assert not outside.any(), "nothing of the first run is left outside the moved region"
    assert seg.GetSegmentation().GetNumberOfSegments() == 2


def test_no_side_on_a_crop_around_one_hippocampus(scene, logic) -> None:
    """An MSD crop is narrower than twice the field of view: no midline, so the names carry no side."""
    vol = logic.bridge.load_volume(default_sample() / "imagesTr" / "hippocampus_015.nii.gz")
    dims = vol.GetImageData().GetDimensions()
    import vtk

    m = vtk.vtkMatrix4x4()
    vol.GetIJKToRASMatrix(m)
    seg, region = logic.segment_at(vol, default_model(), list(m.MultiplyPoint([d / 2 for d in dims] + [1.0])[:3]),
                                   device="cpu")
    assert region.side is None
    names = sorted(seg.GetSegmentation().GetNthSegment(i).GetName() for i in range(seg.GetSegmentation().GetNumberOfSegments()))
    assert names == ["anterior hippocampus", "posterior hippocampus"]


def test_click_on_a_left_handed_file_lands_where_clicked(scene, logic, tmp_path: Path) -> None:
    """A file stored LAS (x flipped, as FSL's MNI152 templates are) is read by Slicer with another voxel order than
    the file's; the click, the crop, the paste and the exported labelmap must still agree in world coordinates."""
    sample = default_sample()
    img = np.asanyarray(nib.load(sample / "imagesTr" / "hippocampus_015.nii.gz").dataobj).astype(np.float32)
    lab = np.rint(np.asanyarray(nib.load(sample / "labelsTr" / "hippocampus_015.nii.gz").dataobj)).astype(np.uint8)
    big = np.full((100, 90, 80), float(np.median(img)), np.float32)
    big += np.random.default_rng(1).normal(0, 5, big.shape).astype(np.float32)
    truth = np.zeros(big.shape, np.uint8)
    o = (50, 20, 20)
    sl = tuple(slice(a, a + n) for a, n in zip(o, img.shape))
    big[sl], truth[sl] = img[::-1], lab[::-1]  # the crop mirrored in i, so its anatomy is unchanged under x → -x
    affine = np.array([[-1.0, 0, 0, 60], [0, 1, 0, -40], [0, 0, 1, -30], [0, 0, 0, 1]])
    path = tmp_path / "las.nii.gz"
    nib.save(nib.Nifti1Image(big, affine), path)
    vol = logic.bridge.load_volume(path)
    click = list((affine @ np.array([*np.argwhere(truth > 0).mean(0), 1.0]))[:3])
    seg, region = logic.segment_at(vol, default_model(), click, device="cpu")
    preset = read_model_card(default_model())["preset"]
    segmentation = seg.GetSegmentation()
    mapping = {v: segmentation.GetSegmentIdBySegmentName(f"{region.side} {n}" if region.side else n)
               for v, n in ((1, "anterior hippocampus"), (2, "posterior hippocampus"))}
    out = logic.bridge.export_labelmap(seg, vol, preset, tmp_path / "out.nii.gz", mapping=mapping)
    exported = nib.load(str(out))
    # compare by world coordinates: every truth voxel's centre looked up in the exported file
    ijk = np.argwhere(truth > 0)
    world = affine @ np.c_[ijk, np.ones(len(ijk))].T
    e = np.rint(np.linalg.inv(exported.affine) @ world)[:3].astype(int)
    data = np.asanyarray(exported.dataobj)
    hit = data[e[0], e[1], e[2]]
    recall = float((hit > 0).mean())
    assert recall > 0.75, f"the exported result covers the hippocampus where it is in the world ({recall:.2f})"
    agree = float((hit[hit > 0] == truth[tuple(ijk[hit > 0].T)]).mean())
    assert agree > 0.75, f"anterior/posterior agree with the truth ({agree:.2f})"
    assert int((data > 0).sum()) < 2.0 * int((truth > 0).sum()), "no spurious region elsewhere"


def test_a_click_with_a_multi_sequence_model_crops_every_sequence(scene, logic, tmp_path: Path) -> None:
    """A brain-tumour model takes several sequences: a click crops each of them around the same point (one on its
    own, shorter grid) and the pasted labels are the engine's on those crops; without the other sequences the click
    is refused, naming them, and leaves no node behind."""
    from DSDSegmentationLib.engine.cards import builtin_models_dir
    from DSDSegmentationLib.engine.data import find_shared_data, list_cases

    model = builtin_models_dir() / "brain-tumour-dsd"
    channels = read_model_card(model)["preset"]["channels"]
    case = next(c for c in list_cases(find_shared_data() / "BraTS2018_2mm", channels=channels)
                if c.id == "Brats18_2013_3_1")
    images = [nib.load(p) for p in case.images]
    nodes = []
    for k, (name, im) in enumerate(zip(channels, images)):
        data, aff = np.asanyarray(im.dataobj).astype(np.float32), im.affine.copy()
        if k == len(channels) - 1:  # the last sequence on another grid: 6 slices shorter, shifted by half a voxel
            data = data[:, :, :-6]
            aff[:3, 3] += 0.5 * aff[:3, 0]
        node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
        slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(data.transpose(2, 1, 0)))
        node.SetIJKToRASMatrix(slicer.util.vtkMatrixFromArray(aff))
        nodes.append(node)
    truth = np.rint(np.asanyarray(nib.load(case.label).dataobj)).astype(int)
    center = ras_of(images[0].affine, np.argwhere(truth > 0).mean(0))
    n_before = scene.GetNumberOfNodes()
    with pytest.raises(InputError, match=f"the model needs {len(channels)} input volumes \\({', '.join(channels)}\\)"):
        logic.start(nodes[0], model, center)
    assert scene.GetNumberOfNodes() == n_before
    seg, region = logic.segment_at(nodes[0], model, center, device="cpu", others=nodes[1:])
    assert not [scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())
                if scene.GetNthNode(i).GetName().endswith(" region")], "no crop node is left behind"
    assert f"'{channels[-1]} region' was resampled onto the grid of '{channels[0]} region'" in region.run.notes, \
        region.run.notes
    # the same crops outside MRML, through the engine
    size = read_model_card(model)["preset"]["roi"]["size_mm"]
    files = []
    for k, node in enumerate(nodes):
        m = _matrix(node, "IJKToRAS")
        olo, ohi = region_ijk(node, center, size)
        if k == 0:
            assert (olo, ohi) == (region.lo, region.hi)
        arr = slicer.util.arrayFromVolume(node).transpose(2, 1, 0)
        aff = m.copy()
        aff[:3, 3] = ras_of(m, olo)
        files.append(tmp_path / f"crop{k}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(arr[olo[0]:ohi[0], olo[1]:ohi[1], olo[2]:ohi[2]]), aff), files[-1])
    lo, hi = region.lo, region.hi
    expected, _ = Predictor(model, device="cpu").predict([str(f) for f in files])
    labels = read_model_card(model)["preset"]["labels"]
    segmentation = seg.GetSegmentation()
    found = 0
    for value, name in ((int(v), n) for v, n in labels.items() if v != "0"):
        sid = segmentation.GetSegmentIdBySegmentName(name)
        assert sid, name
        arr = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, nodes[0]).transpose(2, 1, 0) > 0
        assert np.array_equal(arr[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], expected == value), name
        found += int(arr.sum())
    assert found > 0, "the click found tumour"


def test_a_click_never_loses_what_the_user_edited(scene, logic) -> None:
    """A moved point clears its old region and pastes the new one into the same segments. If the user edited such
    a segment in the meantime, their version is first copied whole to '<name> (edited)' and the notes say so; a
    segment nobody edited is simply replaced, without copies."""
    vol, big, labels, offsets, m = embed(scene)
    c = centroid(labels, offsets["hippocampus_015"])
    seg, first = logic.segment_at(vol, default_model(), ras_of(m, c), device="cpu")
    segmentation = seg.GetSegmentation()
    name = "right posterior hippocampus"
    sid = segmentation.GetSegmentIdBySegmentName(name)
    color = segmentation.GetSegment(sid).GetColor()
    terminology = segmentation.GetSegment(sid).GetTerminology()

    moved = logic.start(vol, default_model(), ras_of(m, [c[0], c[1] + 2, c[2]]), segmentation_node=seg, device="cpu")
    logic.finish(moved, previous=first)  # nobody edited: replaced, no copy, no note
    assert segmentation.GetNumberOfSegments() == 2 and moved.run.notes == []

    edited = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).astype(np.uint8)  # the user paints a blob
    edited[:4, :4, :4] = 1  # outside any region, and one slice inside the region is erased
    k = int(np.argwhere(edited)[-1][0])
    edited[k] = 0
    slicer.util.updateSegmentBinaryLabelmapFromArray(edited, seg, sid, vol)
    again = logic.start(vol, default_model(), ras_of(m, [c[0], c[1] - 2, c[2]]), segmentation_node=seg, device="cpu")
    logic.finish(again, previous=moved)
    names = sorted(segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments()))
    assert names == ["right anterior hippocampus", "right posterior hippocampus", "right posterior hippocampus (edited)"]
    copy = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(f"{name} (edited)"))
    kept = slicer.util.arrayFromSegmentBinaryLabelmap(seg, segmentation.GetSegmentIdBySegmentName(f"{name} (edited)"), vol)
    assert np.array_equal(kept > 0, edited > 0), "the user's version is kept voxel for voxel"
    assert copy.GetColor() == color and copy.GetTerminology() == terminology
    assert again.run.notes == [f"your edited segment '{name}' was kept as a copy, '{name} (edited)'"]
    new = slicer.util.arrayFromSegmentBinaryLabelmap(seg, sid, vol).transpose(2, 1, 0) > 0
    lo, hi = again.lo, again.hi
    assert new[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].any(), "the segment itself takes the new result"
    from DSDSegmentationLib.bridge.logic import is_unchanged_result

    assert is_unchanged_result(segmentation.GetSegment(sid)) and not is_unchanged_result(copy)


def test_a_click_whose_segmentation_was_removed_makes_a_new_one(scene, logic) -> None:
    """A moved point whose segmentation the user deleted meanwhile: the result goes into a new segmentation in the
    scene (not into the removed node), the notes say so."""
    vol, big, labels, offsets, m = embed(scene)
    c = centroid(labels, offsets["hippocampus_015"])
    seg, first = logic.segment_at(vol, default_model(), ras_of(m, c), device="cpu")
    moved = logic.start(vol, default_model(), ras_of(m, [c[0], c[1] + 2, c[2]]), segmentation_node=seg, device="cpu")
    scene.RemoveNode(seg)
    new = logic.finish(moved, previous=first)
    assert new is not seg and scene.IsNodePresent(new) and new.GetSegmentation().GetNumberOfSegments() == 2
    assert any("was removed meanwhile" in n for n in moved.run.notes)
