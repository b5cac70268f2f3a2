"""The sequence-order check on real BraTS 2018 scans: swapped sequences get a note naming them, the true order none,
a check that cannot tell is not kept, and the note reaches the Predictor's notes (hence the CLI and Slicer)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.io import load_channels
from DSDSegmentationLib.engine.cards import builtin_models_dir
from DSDSegmentationLib.engine.models import load_model
from DSDSegmentationLib.engine.sequence_check import (KIND, MIN_THRESHOLD, check_order,
                                                      sequence_features, template_from_cases)

FOUR = ["FLAIR", "T1", "T1c", "T2"]


@pytest.fixture(scope="module")
def brats() -> list:
    return list_cases(find_shared_data() / "BraTS2018_2mm", channels=FOUR)


@pytest.fixture(scope="module")
def four_template(brats) -> dict:
    template, measured = template_from_cases([c.images for c in brats[4:20]], FOUR)
    assert template is not None and template["kind"] == KIND and template["cases"] == 16
    assert measured["false_alarms"] == 0.0 and measured["two_swapped_flagged"] >= 0.8, measured
    assert template["threshold"] >= MIN_THRESHOLD
    return template


def test_held_out_scans_in_their_order_get_no_note(brats, four_template) -> None:
    for case in brats[:4]:  # not among the template's cases
        image, _ = load_channels(case.images)
        assert check_order(image, four_template, FOUR) is None, case.id


def test_two_swapped_sequences_are_named(brats, four_template) -> None:
    image, _ = load_channels(brats[0].images)
    given = ["a_flair.nii.gz", "b_t2.nii.gz", "c_t1c.nii.gz", "d_t1.nii.gz"]  # T1 and T2 swapped by the user
    note = check_order(image[[0, 3, 2, 1]], four_template, FOUR, given=given)
    assert note is not None
    assert note.startswith("b_t2.nii.gz (given as T1) and d_t1.nii.gz (given as T2) look swapped: the first looks like "
                           "T2, the second like T1"), note
    # without names for the inputs the note still says which
    assert check_order(image[[0, 3, 2, 1]], four_template, FOUR).startswith("the T1 input and the T2 input look swapped")


def test_no_statistics_no_note(brats, four_template) -> None:
    image, _ = load_channels(brats[0].images)
    head = image.copy()  # noisy air instead of a constant background: not skull-stripped, no brain mask
    head[:, np.all(image == 0, axis=0)] = np.random.default_rng(0).uniform(1, 30, (4, int(np.all(image == 0, axis=0).sum())))
    assert check_order(head, four_template, FOUR) is None
    assert sequence_features(head) is None
    assert check_order(image, None, FOUR) is None  # a model without a template
    assert check_order(image[:2], four_template, FOUR[:2]) is None  # a template for other inputs is not used


def test_a_check_that_cannot_tell_is_not_kept(brats) -> None:
    # FLAIR and T1c alone: the correlation is the same in both orders, the histograms overlap (measured: 0 of 32
    # swaps flagged at a threshold without false alarms)
    template, measured = template_from_cases([[c.images[0], c.images[2]] for c in brats[4:16]], ["FLAIR", "T1c"])
    assert template is None and measured["two_swapped_flagged"] < 0.5


def test_the_shipped_models_check_their_inputs_order(brats, tmp_path: Path) -> None:
    """The four-sequence model's card carries a template from its training cases: its own validation case in the
    right order runs without a note, with T1 and T2 swapped the Predictor's notes name both files (the CLI prints
    them, Slicer ends the Done message with them). The FLAIR + T1c model's card carries none (too weak)."""
    from DSDSegmentationLib.engine.inference import Predictor

    model = load_model(builtin_models_dir() / "brain-tumour-dsd")
    assert model.card["input_check"]["kind"] == KIND and model.card["inputs"] == FOUR
    assert model.card["input_check"]["measured"]["false_alarms"] == 0.0
    assert "input_check" not in load_model(builtin_models_dir() / "brain-tumour-2seq-dsd").card
    case = next(c for c in brats if c.id == model.card["split"]["val_ids"][0])
    files = []
    for name, src in zip(FOUR, case.images):
        files.append(tmp_path / f"{name}.nii.gz")
        shutil.copy(src, files[-1])
    predictor = Predictor(model, device="cpu")
    labels, _ = predictor.predict([str(f) for f in files])
    assert predictor.notes == [] and labels.shape == load_channels([str(files[0])])[0].shape[1:]
    predictor.predict([str(files[0]), str(files[3]), str(files[2]), str(files[1])])
    assert len(predictor.notes) == 1
    assert predictor.notes[0].startswith("T2.nii.gz (given as T1) and T1.nii.gz (given as T2) look swapped"), predictor.notes


def _zscored_with_constant_background(image: np.ndarray) -> np.ndarray:
    """What some pipelines hand over (the BraTS 2015 sample among them): each sequence z-scored over the brain and
    the background set to a constant below every brain value instead of 0."""
    out = np.empty_like(image)
    for c, x in enumerate(image):
        m = x != 0
        z = np.zeros_like(x)
        z[m] = (x[m] - x[m].mean()) / x[m].std()
        z[~m] = z[m].min() - 0.5
        out[c] = z
    return out


def test_a_constant_nonzero_background_is_preprocessed_like_a_zero_one(brats, four_template) -> None:
    """Measured before the fix (4-sequence checkpoint, 6 validation cases): such scans lost whole tumour Dice 0.888 →
    0.682 and enhancing tumour 0.766 → 0.249, as the background entered the z-score; now the model input is the
    same, and so is the sequence check."""
    import torch
    from monai.data import MetaTensor

    from DSDSegmentationLib.engine.tasks import load_preset
    from DSDSegmentationLib.engine.transforms import inference_transforms

    image, affine = load_channels(brats[1].images)
    shifted = _zscored_with_constant_background(image)
    t = inference_transforms(load_preset("brain_tumour"))
    a, b = ({"image": MetaTensor(torch.from_numpy(x), affine=torch.as_tensor(affine))} for x in (image, shifted))
    pa, pb = t(a)["image"], t(b)["image"]
    assert pa.shape == pb.shape
    np.testing.assert_allclose(pb.numpy(), pa.numpy(), atol=1e-4)
    np.testing.assert_allclose(sequence_features(shifted), sequence_features(image), atol=1e-6)
    assert check_order(shifted[[0, 3, 2, 1]], four_template, FOUR) is not None  # T1 and T2 swapped: still seen


def test_a_sequence_off_against_the_first_gets_a_note(brats, tmp_path: Path) -> None:
    """The registration check (engine/registration_check.py) on real BraTS 2018 scans: registered cases read well
    under the warning distance for every further sequence (no note); the T1c with its header moved by 4 mm is found
    displaced by about 4 mm along that axis, named in a note, and the note reaches the Predictor's notes (so the CLI
    and the panel's Done message); a model with one input is never checked."""
    import nibabel as nib

    from DSDSegmentationLib.engine.inference import Predictor
    from DSDSegmentationLib.engine.registration_check import WARN_MM, displacement_mm, misregistration_notes

    for case in brats[:6]:
        raw, affine = load_channels(case.images, resample=True)
        assert misregistration_notes(raw, affine, FOUR) == [], case.id
        for c in (1, 2, 3):
            d, edge = displacement_mm(raw[0], raw[c], np.array([2.0, 2.0, 2.0]))
            assert np.linalg.norm(d) < WARN_MM / 2 and not edge, (case.id, FOUR[c], d)
    case = brats[0]
    img = nib.load(case.images[2])
    moved = img.affine.copy()
    moved[0, 3] += 4.0 * np.sign(moved[0, 0])  # 2 voxels along the array's first axis
    t1c = tmp_path / "t1c_moved.nii.gz"
    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), moved, img.header), t1c)
    images = [case.images[0], case.images[1], str(t1c), case.images[3]]
    raw, affine = load_channels(images, resample=True)
    (note,) = misregistration_notes(raw, affine, FOUR)
    assert note.startswith("T1c appears displaced against FLAIR by ") and "register them" in note, note
    d, edge = displacement_mm(raw[0], raw[2], np.array([2.0, 2.0, 2.0]))
    assert abs(abs(d[0]) - 4.0) < 0.5 and abs(d[1]) < 0.7 and abs(d[2]) < 0.7 and not edge, d
    two = builtin_models_dir() / "brain-tumour-2seq-dsd"
    predictor = Predictor(two, device="cpu")
    predictor.predict([case.images[0], str(t1c)])
    assert any(n.startswith("T1c appears displaced against FLAIR") for n in predictor.notes), predictor.notes
    assert misregistration_notes(raw[:1], affine, FOUR[:1]) == []
