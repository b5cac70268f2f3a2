"""Dataset layouts (MSD single/4D/per-channel files, nnU-Net raw, plain lists) and their validation."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from DSDSegmentationLib.engine import InputError
from DSDSegmentationLib.engine.data import dataset_labels, list_cases, split_by_patient, validate_case
from DSDSegmentationLib.engine.transforms import LoadCased


@pytest.fixture(scope="module")
def brats_dir(hippocampus_dir: Path) -> Path:
    return hippocampus_dir.parent / "BraTS2015_DeepMedicSample"


def _crop(src: Path, dst: Path) -> None:
    img = nib.load(src)
    data = np.asanyarray(img.dataobj)[100:132, 100:140, 60:84]
    nib.save(nib.Nifti1Image(data, img.affine), dst)


def test_msd_per_channel_files_and_float_labels(brats_dir: Path) -> None:
    cases = list_cases(brats_dir)
    assert len(cases) == 6
    c = cases[0]
    assert [Path(p).name for p in c.images] == ["brats_2013_pat0001_1_0000.nii.gz", "brats_2013_pat0001_1_0001.nii.gz"]
    info = validate_case(c, 2, range(5))  # BraTS labels are stored as float32 0.0..4.0: accepted as integers
    assert info["label_values"] == [0, 1, 2, 3, 4]
    with pytest.raises(InputError, match="2 image channel\\(s\\), the task expects 1"):
        validate_case(c, 1, range(5))
    assert dataset_labels(brats_dir)[4] == "enhancing tumour"


def test_nnunet_raw_layout_and_4d_msd(brats_dir: Path, tmp_path: Path) -> None:
    src = list_cases(brats_dir, limit=2)
    nn = tmp_path / "Dataset001_BraTS"
    (nn / "imagesTr").mkdir(parents=True)
    (nn / "labelsTr").mkdir()
    for c in src:
        for i, p in enumerate(c.images):
            _crop(Path(p), nn / "imagesTr" / f"{c.id}_{i:04d}.nii.gz")
        _crop(Path(c.label), nn / "labelsTr" / f"{c.id}.nii.gz")
    (nn / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1c"}, "file_ending": ".nii.gz", "numTraining": 2,
        "labels": {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing tumour": 3, "enhancing tumour": 4}}))
    cases = list_cases(nn)
    assert [c.id for c in cases] == [c.id for c in src] and all(len(c.images) == 2 for c in cases)
    assert dataset_labels(nn) == {0: "background", 1: "necrosis", 2: "edema", 3: "non-enhancing tumour", 4: "enhancing tumour"}
    for c in cases:
        validate_case(c, 2, range(5))
    # the same two channels as one 4D file in an MSD layout load identically
    msd = tmp_path / "msd4d"
    (msd / "imagesTr").mkdir(parents=True)
    (msd / "labelsTr").mkdir()
    c = cases[0]
    chans = [nib.load(p) for p in c.images]
    nib.save(nib.Nifti1Image(np.stack([np.asanyarray(x.dataobj) for x in chans], -1), chans[0].affine), msd / "imagesTr" / "a.nii.gz")
    nib.save(nib.load(c.label), msd / "labelsTr" / "a.nii.gz")
    (msd / "dataset.json").write_text(json.dumps({"modality": {"0": "FLAIR", "1": "T1c"}, "labels": {"0": "bg"},
                                                 "training": [{"image": "./imagesTr/a.nii.gz", "label": "./labelsTr/a.nii.gz"}]}))
    (m4,) = list_cases(msd)
    validate_case(m4, 2, range(5))
    a = LoadCased()({"image": c.images, "label": c.label})
    b = LoadCased()({"image": m4.images, "label": m4.label})
    assert a["image"].shape == b["image"].shape == (2, 32, 40, 24)
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))


def test_list_files(hippocampus_dir: Path, tmp_path: Path) -> None:
    img = hippocampus_dir / "imagesTr"
    lab = hippocampus_dir / "labelsTr"
    (tmp_path / "l.json").write_text(json.dumps([
        {"image": str(img / "hippocampus_001.nii.gz"), "label": str(lab / "hippocampus_001.nii.gz"), "patient": "A"},
        {"image": [str(img / "hippocampus_003.nii.gz")], "label": str(lab / "hippocampus_003.nii.gz"), "patient": "A"},
        {"image": str(img / "hippocampus_004.nii.gz"), "label": str(lab / "hippocampus_004.nii.gz"), "patient": "B"}]))
    cases = list_cases(tmp_path / "l.json")
    assert [c.patient for c in cases] == ["A", "A", "B"]
    train, val = split_by_patient(cases, 0.5, seed=0)
    assert {c.patient for c in train}.isdisjoint({c.patient for c in val}) and len(train) + len(val) == 3
    (tmp_path / "bad.csv").write_text("label\nx.nii.gz\n")
    with pytest.raises(InputError, match="entry 1 has no 'image'"):
        list_cases(tmp_path / "bad.csv")
    with pytest.raises(InputError, match="at least 2 patients"):
        split_by_patient(cases[:2], 0.5)


def test_missing_and_duplicate_cases(tmp_path: Path) -> None:
    (tmp_path / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}))
    with pytest.raises(InputError, match="case x: image .* listed in dataset.json is missing"):
        list_cases(tmp_path)
    with pytest.raises(InputError, match="has no dataset.json"):
        list_cases(tmp_path / "nothing")


def test_unit_sform_rule_reads_acdc_with_its_true_spacing(hippocampus_dir: Path, tmp_path: Path) -> None:
    """ACDC stores a 1 mm sform while pixdim holds the true spacing: read with pixdim, and say so naming the file.
    Files whose affine is not unit-length, or whose valid qform disagrees, keep the header's affine."""
    import warnings

    import nibabel as nib

    from DSDSegmentationLib.engine.io import GeometryWarning, load_volume

    acdc = hippocampus_dir.parent / "ACDC_subset" / "imagesTr" / "patient001_frame01.nii.gz"
    header = nib.load(acdc)
    assert np.allclose(np.abs(np.diag(header.affine))[:3], 1.0), "the ACDC header as shipped: unit sform"
    with pytest.warns(GeometryWarning, match="patient001_frame01.nii.gz: .* pixdim says 1.5625 x 1.5625 x 10 mm"):
        data, affine = load_volume(acdc)
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [1.5625, 1.5625, 10.0])
    np.testing.assert_allclose(np.sign(np.diag(affine)[:3]), np.sign(np.diag(header.affine)[:3]))
    np.testing.assert_allclose(affine[:3, 3], header.affine[:3, 3])
    with warnings.catch_warnings():
        warnings.simplefilter("error", GeometryWarning)
        _, hip = load_volume(hippocampus_dir / "imagesTr" / "hippocampus_001.nii.gz")  # 1 mm and pixdim 1: as is
        # a valid qform with real spacing next to a unit sform: nibabel's sform stands, no rule
        arr = np.zeros((8, 8, 8), np.int16)
        img = nib.Nifti1Image(arr, np.eye(4))
        img.set_qform(np.diag([2.0, 2.0, 2.0, 1.0]), code=1)
        img.set_sform(np.eye(4), code=1)
        img.header["pixdim"][1:4] = [2.0, 2.0, 2.0]
        nib.save(img, str(tmp_path / "q.nii.gz"))
        _, q = load_volume(tmp_path / "q.nii.gz")
    np.testing.assert_allclose(q, np.eye(4))


def test_hippocampus_normalisation_ignores_empty_background(hippocampus_dir: Path) -> None:
    """The hippocampus preset's 'percentile, nonzero' normalisation: a real case alone or inside a large empty
    (skull-stripped / padded) surrounding gives the same values on the case, and the surrounding stays 0."""
    import torch

    from DSDSegmentationLib.engine.tasks import load_preset
    from DSDSegmentationLib.engine.transforms import NormalizeChannelsd

    preset = load_preset("hippocampus")
    assert preset.normalization == [{"kind": "percentile", "lower": 0.5, "upper": 99.5, "nonzero": True}]
    x = np.asanyarray(nib.load(hippocampus_dir / "imagesTr" / "hippocampus_015.nii.gz").dataobj).astype(np.float32)
    x[x == 0] = 1.0  # a voxel of exactly 0 inside the crop would be 'no data' by the rule; keep the comparison exact
    big = np.zeros((3 * x.shape[0], 2 * x.shape[1], 2 * x.shape[2]), np.float32)
    sl = tuple(slice(4, 4 + n) for n in x.shape)
    big[sl] = x
    norm = NormalizeChannelsd(preset.normalization)
    alone = norm({"image": torch.from_numpy(x[None])})["image"][0].numpy()
    inside = norm({"image": torch.from_numpy(big[None])})["image"][0].numpy()
    assert np.allclose(alone, inside[sl], atol=1e-4)
    rest = inside.copy()
    rest[sl] = 0
    assert not rest.any()
    assert abs(float(alone.mean())) < 0.05 and abs(float(alone.std()) - 1) < 0.05
    # the old rule (z-score over the whole crop) is what made a skull-stripped crop look different
    z = NormalizeChannelsd([{"kind": "zscore", "nonzero": False}])
    assert not np.allclose(z({"image": torch.from_numpy(x[None])})["image"][0].numpy(),
                           z({"image": torch.from_numpy(big[None])})["image"][0].numpy()[sl], atol=0.1)


def test_background_augmentation_never_cuts_the_structure(hippocampus_dir: Path) -> None:
    """RandBackgroundSlabd zeroes a slab of the image beyond the labelled structure and never touches the label."""
    import torch

    from DSDSegmentationLib.engine.tasks import load_preset
    from DSDSegmentationLib.engine.transforms import RandBackgroundSlabd, isotropic, training_transforms

    x = torch.from_numpy(np.asanyarray(nib.load(hippocampus_dir / "imagesTr" / "hippocampus_015.nii.gz").dataobj)
                         .astype(np.float32)[None] + 1)
    y = torch.from_numpy(np.rint(np.asanyarray(nib.load(hippocampus_dir / "labelsTr" / "hippocampus_015.nii.gz")
                                                .dataobj)).astype(np.float32)[None])
    t = RandBackgroundSlabd(prob=1.0)
    t.set_random_state(3)
    zeroed = []
    for _ in range(40):
        d = t({"image": x.clone(), "label": y.clone()})
        assert torch.equal(d["label"], y)
        assert bool((d["image"][y > 0] != 0).all()), "no voxel of the structure is zeroed"
        zeroed.append(float((d["image"] == 0).float().mean()))
    assert max(zeroed) > 0.05 and min(zeroed) < max(zeroed), zeroed
    preset = load_preset("hippocampus")
    assert isotropic(preset) and not isotropic(load_preset("cardiac"))
    _, random = training_transforms(preset)
    names = [type(tr).__name__ for tr in random.transforms]
    assert "RandBackgroundSlabd" in names and "RandBiasFieldd" in names and "RandAffined" in names
    affine = next(tr for tr in random.transforms if type(tr).__name__ == "RandAffined")
    ranges = affine.rand_affine.rand_affine_grid.rotate_range
    assert len([r for r in ranges if r]) == 3, "rotations about all three axes on an isotropic grid"


def test_a_cine_stack_with_its_slices_first_is_segmented_as_stored_natively(hippocampus_dir: Path, tmp_path: Path) -> None:
    """The cardiac preset keeps the slices on the third axis and does not reorient: a stack stored with its slices
    along the first axis (same voxels, same place in space) used to be cut into 160 x 160 x 8 patches across the
    slices (mean Dice 0.34 instead of 0.88 on 4 validation cases, 60 s a frame). Inference and training now bring
    the slices to the model's slice axis, and inference puts the result back on the input's grid."""
    import warnings

    from DSDSegmentationLib.engine.cards import builtin_models_dir
    from DSDSegmentationLib.engine.inference import Predictor
    from DSDSegmentationLib.engine.io import GeometryWarning, load_volume, permute_axes
    from DSDSegmentationLib.engine.tasks import load_preset

    acdc = hippocampus_dir.parent / "ACDC_subset"
    image, label = acdc / "imagesTr" / "patient001_frame01.nii.gz", acdc / "labelsTr" / "patient001_frame01.nii.gz"
    preset = load_preset("cardiac")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        data, affine = load_volume(image)
        lab, _ = load_volume(label)
    first = (2, 0, 1)  # slices first, in-plane order kept
    for name, arr in (("img", data), ("lab", lab)):
        moved, moved_affine = permute_axes(np.asarray(arr, np.float32), affine, first)
        nib.save(nib.Nifti1Image(moved, moved_affine), tmp_path / f"{name}.nii.gz")
    # every voxel stays where it was in space
    np.testing.assert_allclose(moved_affine @ [3, 5, 7, 1], affine @ [5, 7, 3, 1])
    assert preset.slice_axis_order(moved_affine) == (1, 2, 0) and preset.slice_axis_order(affine) is None
    assert load_preset("hippocampus").slice_axis_order(moved_affine) is None  # reorients to RAS anyway
    assert preset.slice_axis_order(np.diag([1.0, 1.2, 1.5, 1.0])) is None  # no clear slice axis: left as it is

    predictor = Predictor(builtin_models_dir() / "cardiac-dsd", device="cpu")
    native, _ = predictor.predict(str(image))
    moved_labels, out_affine = predictor.predict(str(tmp_path / "img.nii.gz"))
    assert moved_labels.shape == moved.shape and np.allclose(out_affine, moved_affine, atol=1e-5)
    assert np.mean(moved_labels.transpose(1, 2, 0) == native) > 0.999
    assert any("slices (10 mm apart) lie along array axis 0" in n for n in predictor.notes), predictor.notes

    loaded = LoadCased(preset=preset)({"image": [str(tmp_path / "img.nii.gz")], "label": str(tmp_path / "lab.nii.gz")})
    reference = LoadCased(preset=preset)({"image": [str(image)], "label": str(label)})
    assert loaded["image"].shape == reference["image"].shape and loaded["label"].shape == reference["label"].shape
    np.testing.assert_allclose(loaded["image"].numpy(), reference["image"].numpy())
    np.testing.assert_allclose(loaded["label"].numpy(), reference["label"].numpy())
    np.testing.assert_allclose(loaded["image"].affine.numpy(), reference["image"].affine.numpy(), atol=1e-5)
