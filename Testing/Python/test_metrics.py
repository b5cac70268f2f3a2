"""Metrics against analytic shapes, MONAI's functions, and the defined empty cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.metrics import (compute_average_surface_distance, compute_dice, compute_hausdorff_distance,
                           compute_surface_dice)

from DSDSegmentationLib.engine.metrics import case_metrics, class_metrics, summarize


def box(shape, lo, hi) -> np.ndarray:
    a = np.zeros(shape, bool)
    a[tuple(slice(l, h) for l, h in zip(lo, hi))] = True
    return a


def sphere(shape, center, radius, spacing=(1, 1, 1)) -> np.ndarray:
    grid = np.meshgrid(*[(np.arange(n) - c) * s for n, c, s in zip(shape, center, spacing)], indexing="ij")
    return sum(g**2 for g in grid) <= radius**2


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 1.0, 1.0), (0.5, 0.7, 3.0)])
def test_shifted_box(spacing) -> None:
    a = box((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = box((30, 30, 30), (7, 5, 5), (17, 15, 15))  # shifted by 2 voxels along axis 0
    m = class_metrics(a, b, spacing)
    assert m["dice"] == pytest.approx(2 * 8 * 100 / 2000)
    assert m["hd95"] == pytest.approx(2 * spacing[0])  # the faces that moved are 2 voxels apart along axis 0
    assert 0 < m["assd"] < m["hd95"]
    assert m["volume_ref_ml"] == pytest.approx(1000 * np.prod(spacing) / 1000)


def test_concentric_spheres_distance_in_mm() -> None:
    spacing = (0.8, 0.8, 2.0)
    a = sphere((80, 80, 40), (40, 40, 20), 20.0, spacing)
    b = sphere((80, 80, 40), (40, 40, 20), 26.0, spacing)
    m = class_metrics(a, b, spacing)
    assert m["assd"] == pytest.approx(6.0, abs=1.0)
    assert m["hd95"] == pytest.approx(6.0, abs=1.5)


def test_agrees_with_monai() -> None:
    rng = np.random.default_rng(0)
    a = sphere((40, 40, 40), (20, 20, 20), 10) & (rng.random((40, 40, 40)) > 0.05)
    b = sphere((40, 40, 40), (22, 19, 20), 9)
    spacing = (1.0, 1.5, 2.0)
    m = class_metrics(a, b, spacing)
    t = lambda x: torch.from_numpy(x)[None, None]  # noqa: E731
    assert m["dice"] == pytest.approx(float(compute_dice(t(a), t(b))[0, 0]), rel=1e-6)
    assert m["hd95"] == pytest.approx(float(compute_hausdorff_distance(t(a), t(b), percentile=95, spacing=list(spacing))[0, 0]), rel=1e-6)
    # on a large grid (class_metrics works in the bounding box of both; MONAI here on the whole grid), and touching
    # the grid's border
    for pad in (((30, 2), (0, 25), (12, 0)), ((0, 0), (0, 0), (0, 0))):
        A, B = np.pad(a, pad), np.pad(b, pad)
        if pad[0][0] == 0:
            A[0, :, :5] = True
        big = class_metrics(A, B, spacing)
        assert big["hd95"] == pytest.approx(float(compute_hausdorff_distance(t(A), t(B), percentile=95, spacing=list(spacing))[0, 0]), rel=1e-6)
        assert big["assd"] == pytest.approx(float(compute_average_surface_distance(t(A), t(B), symmetric=True, spacing=list(spacing))[0, 0]), rel=1e-6)
        two = lambda x: torch.stack([~t(x)[0, 0], t(x)[0, 0]])[None].float()  # noqa: E731
        assert big["surface_dice"] == pytest.approx(float(compute_surface_dice(two(A), two(B), class_thresholds=[1.0], spacing=list(spacing))[0, 0]), rel=1e-6)
        assert big["dice"] == pytest.approx(float(compute_dice(t(A), t(B))[0, 0]), rel=1e-6)


def test_empty_cases_are_defined() -> None:
    z = np.zeros((10, 10, 10), bool)
    s = box(z.shape, (2, 2, 2), (5, 5, 5))
    assert class_metrics(z, z, (1, 1, 1)) == {"volume_pred_ml": 0.0, "volume_ref_ml": 0.0, "volume_diff_ml": 0.0,
                                              "volume_diff_pct": None, "tolerance_mm": 1.0, "dice": 1.0, "hd95": 0.0,
                                              "assd": 0.0, "surface_dice": 1.0, "empty": "both"}
    missed = class_metrics(z, s, (1, 1, 1))
    assert (missed["dice"], missed["hd95"], missed["assd"], missed["empty"]) == (0.0, None, None, "prediction")
    extra = class_metrics(s, z, (1, 1, 1))
    assert (extra["dice"], extra["hd95"], extra["empty"]) == (0.0, None, "reference")


def test_case_metrics_and_summary() -> None:
    ref = np.zeros((20, 20, 20), np.uint8)
    ref[2:8, 2:8, 2:8] = 1
    ref[10:16, 10:16, 10:16] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    rows = [{"case": "c", "classes": case_metrics(pred, ref, {0: "bg", 1: "one", 2: "two"}, (1, 1, 1))}]
    assert rows[0]["classes"]["one"]["dice"] == 1.0 and rows[0]["classes"]["one"]["hd95"] == 0.0
    s = summarize(rows)
    assert s["two"]["dice"]["mean"] == 0.0 and s["two"]["hd95"]["mean"] is None and s["two"]["undefined_distance"] == 1


def test_surface_dice_and_volume_difference_on_spheres() -> None:
    spacing = (0.8, 0.8, 2.0)
    a = sphere((80, 80, 40), (40, 40, 20), 20.0, spacing)
    b = sphere((80, 80, 40), (40, 40, 20), 26.0, spacing)
    assert class_metrics(a, b, spacing, tolerance_mm=4.0)["surface_dice"] < 0.05  # every boundary point is ~6 mm off
    assert class_metrics(a, b, spacing, tolerance_mm=8.0)["surface_dice"] > 0.95
    m = class_metrics(a, b, spacing)
    assert m["volume_diff_pct"] == pytest.approx(100 * (20**3 / 26**3 - 1), abs=3.0)
    assert m["volume_diff_ml"] == pytest.approx(m["volume_pred_ml"] - m["volume_ref_ml"])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.5, 0.7, 3.0)])
def test_surface_dice_of_shifted_box_in_mm(spacing) -> None:
    a = box((30, 30, 30), (5, 5, 5), (15, 15, 15))
    b = box((30, 30, 30), (7, 5, 5), (17, 15, 15))
    assert class_metrics(a, b, spacing, tolerance_mm=2 * spacing[0] + 1e-3)["surface_dice"] == pytest.approx(1.0)
    assert class_metrics(a, b, spacing, tolerance_mm=0.5 * spacing[0])["surface_dice"] < 0.9


def test_regions_are_unions_of_labels() -> None:
    from DSDSegmentationLib.engine.metrics import case_metrics, unlisted_values

    ref = np.zeros((20, 20, 20), int)
    ref[2:8, 2:8, 2:8] = 2  # edema
    ref[4:6, 4:6, 4:6] = 4  # enhancing inside it
    pred = ref.copy()
    pred[pred == 4] = 1  # enhancing called necrotic: labels disagree, the whole tumour does not
    labels = {0: "bg", 1: "core", 2: "edema", 4: "enhancing"}
    m = case_metrics(pred, ref, labels, (1.0, 1.0, 1.0), regions={"WT": [1, 2, 4], "TC": [1, 4], "ET": [4]})
    assert m["WT"]["dice"] == 1.0 and m["TC"]["dice"] == 1.0 and m["ET"]["dice"] == 0.0
    assert m["enhancing"]["dice"] == 0.0 and m["WT"]["region"] == [1, 2, 4]
    assert unlisted_values(np.array([0, 3, 4, 7]), labels) == [3, 7]


def test_largest_component_post_processing_as_the_card_says() -> None:
    """``preset.postprocessing``: per label, only its largest 26-connected region stays (a stray island of a label
    goes, touching labels each keep theirs); 'foreground' keeps the largest region of all labels together."""
    import pytest

    from DSDSegmentationLib.engine.errors import ConfigError
    from DSDSegmentationLib.engine.postprocess import keep_largest_component
    from DSDSegmentationLib.engine.tasks import load_preset

    labels = np.zeros((20, 20, 10), np.uint8)
    labels[2:8, 2:8, 2:6] = 1  # the right ventricle
    labels[8:14, 2:8, 2:6] = 2  # touching it: the myocardium
    labels[17:19, 17:19, 8:10] = 1  # a stray island of label 1, far away
    labels[17:19, 2:4, 8:10] = 3  # the only region of label 3
    per_label = keep_largest_component(labels, "per_label")
    assert (per_label[17:19, 17:19, 8:10] == 0).all() and (per_label[2:8, 2:8, 2:6] == 1).all()
    assert (per_label[8:14, 2:8, 2:6] == 2).all() and (per_label[17:19, 2:4, 8:10] == 3).all()
    foreground = keep_largest_component(labels, "foreground")
    assert (foreground[2:14, 2:8, 2:6] > 0).all() and foreground[17:19].sum() == 0
    with pytest.raises(ValueError, match="unknown post-processing"):
        keep_largest_component(labels, "largest")
    assert load_preset("cardiac").postprocessing == "per_label" and load_preset("hippocampus").postprocessing is None
    with pytest.raises(ConfigError, match="postprocessing must be"):
        type(load_preset("cardiac")).from_dict({**load_preset("cardiac").to_dict(), "postprocessing": "largest"})
