"""`dsdseg qa` report and the uncertainty map of `dsdseg predict --uncertainty`."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from DSDSegmentationLib.worker.cli import main as cli
from DSDSegmentationLib.engine.metrics import class_metrics

pytest.importorskip("vtk", reason="vtk is part of the test install (.ci/setup)")


def ball(shape, centre, radius, spacing):
    grid = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def test_qa_report_on_a_sphere_with_a_bump(tmp_path: Path) -> None:
    spacing = (0.8, 1.0, 2.0)
    shape = (60, 50, 30)
    ref = ball(shape, (24, 25, 30), 10.0, spacing)
    pred = ball(shape, (24, 25, 30), 11.0, spacing) | ball(shape, (38, 25, 30), 4.0, spacing)
    affine = np.diag([*spacing, 1.0])
    image = (ref * 100 + np.random.default_rng(0).normal(0, 10, shape)).astype(np.float32)
    files = {}
    for name, arr in (("pred", pred.astype(np.uint8)), ("ref", ref.astype(np.uint8)), ("img", image)):
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, affine), files[name])
    out = tmp_path / "qa"
    assert cli(["qa", str(files["pred"]), str(files["ref"]), "--labels", "hippocampus", "--image", str(files["img"]),
                "--output", str(out), "--worst", "3", "--progress", "none"]) == 0
    report = json.loads((out / "qa.json").read_text())
    expected = class_metrics(pred, ref, spacing, 1.0)
    got = report["metrics"]["anterior hippocampus"]
    assert got["dice"] == pytest.approx(expected["dice"]) and got["hd95"] == pytest.approx(expected["hd95"])
    assert report["metrics"]["posterior hippocampus"]["empty"] == "both"
    first = report["worst_errors"][0]
    assert first["kind"] == "extra" and first["distance_mm"] > 3.5 and first["ijk"][0] * spacing[0] > 34
    from PIL import Image

    for png in [e["png"] for e in report["worst_errors"]] + list(report["surfaces"].values()):
        assert np.asarray(Image.open(png).convert("RGB"), dtype=float).std() > 10, f"{png} looks blank"
    page = (out / "index.html").read_text()
    assert "anterior hippocampus" in page and "errors/error_1.png" in page and "surfaces/anterior_hippocampus.png" in page


def test_qa_report_without_matplotlib_as_in_slicers_python(tmp_path: Path, monkeypatch) -> None:
    """Slicer's Python has no matplotlib (Slicer 5.10 ships numpy, scipy, vtk, ... but not it; the extension does not
    install it). `PythonSlicer -m DSDSegmentationLib.worker.cli qa` then writes the whole report less the outline
    pictures, and says so, instead of stopping with ModuleNotFoundError after the metrics."""
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    spacing = (1.0, 1.0, 1.0)
    ref = ball((40, 40, 30), (20, 20, 15), 8.0, spacing)
    pred = ball((40, 40, 30), (22, 20, 15), 8.0, spacing)
    files = {}
    for name, arr in (("pred", pred.astype(np.uint8)), ("ref", ref.astype(np.uint8))):
        files[name] = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, np.eye(4)), files[name])
    out = tmp_path / "qa"
    assert cli(["qa", str(files["pred"]), str(files["ref"]), "--labels", "hippocampus", "--output", str(out),
                "--worst", "2", "--progress", "none"]) == 0
    report = json.loads((out / "qa.json").read_text())
    assert report["metrics"]["anterior hippocampus"]["dice"] == pytest.approx(class_metrics(pred, ref, spacing, 1.0)["dice"])
    assert report["worst_errors"] and all(e["png"] is None for e in report["worst_errors"])
    assert not (out / "errors").exists() and Path(report["surfaces"]["anterior hippocampus"]).is_file()  # vtk's
    assert any("need matplotlib" in n for n in report["notes"])
    page = (out / "index.html").read_text()
    assert "need matplotlib" in page and "#1 anterior hippocampus" in page and "errors/error_1.png" not in page


def test_uncertainty_is_high_where_the_model_is_wrong(tmp_path: Path) -> None:
    from DSDSegmentationLib.bridge.demo import default_model, default_sample

    case = default_sample()
    img = case / "imagesTr" / "hippocampus_015.nii.gz"
    lab, unc = tmp_path / "lab.nii.gz", tmp_path / "unc.nii.gz"
    assert cli(["predict", "--model", str(default_model()), "-i", str(img), "-o", str(lab), "--uncertainty", str(unc),
                "--tta", "--device", "cpu", "--progress", "none"]) == 0
    u = nib.load(unc).get_fdata()
    pred = nib.load(lab).get_fdata()
    ref = nib.load(case / "labelsTr" / "hippocampus_015.nii.gz").get_fdata()
    assert u.shape == ref.shape and 0 <= u.min() and u.max() <= 1
    wrong = pred != ref
    assert wrong.any()
    assert u[wrong].mean() > 5 * u[~wrong].mean()


@pytest.mark.parametrize("seed", range(6))
def test_worst_errors_computed_in_the_bounding_box_equal_the_whole_volume(seed: int) -> None:
    """boundary_errors works within the bounding box of both masks (a tumour's is ~1/15 of the volume): the same
    points and distances as on the whole grid, also for masks that touch the volume's border or lie apart."""
    from DSDSegmentationLib.engine import qa

    rng = np.random.default_rng(seed)
    shape, spacing = (40, 36, 30), (1.0, 0.8, 2.5)
    pred = ball(shape, rng.uniform(0, 30, 3), rng.uniform(5, 12), spacing)
    ref = ball(shape, rng.uniform(0, 30, 3), rng.uniform(5, 12), spacing) | (rng.random(shape) > 0.999)
    if seed == 0:
        pred[:, :, 0] = True  # on the border
    whole = qa._boundary_errors(pred, ref, spacing, 8, 3.0, None)
    assert qa.boundary_errors(pred, ref, spacing, count=8, min_separation_mm=3.0) == whole and whole
