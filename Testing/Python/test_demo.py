"""The README's main command end to end: bundled model + bundled sample through the Logic on a real MRML scene."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")

from DSDSegmentationLib.bridge.demo import MARKER, claim_output_folder, default_model, default_sample, main, run_demo  # noqa: E402
from DSDSegmentationLib.engine.errors import InputError  # noqa: E402
from DSDSegmentationLib.engine.cards import read_model_card  # noqa: E402
from DSDSegmentationLib.engine.data import list_cases  # noqa: E402
from DSDSegmentationLib.engine.terminology import tag_string  # noqa: E402
from DSDSegmentationLib.bridge.headless import read_mrb, setup_headless  # noqa: E402


def test_sample_data_ships_with_attribution() -> None:
    sample = default_sample()
    cases = list_cases(sample)
    assert len(cases) == 3
    text = (sample / "ATTRIBUTION.md").read_text()
    assert "CC-BY-SA 4.0" in text and "Medical Segmentation Decathlon" in text
    val_ids = read_model_card(default_model())["split"]["val_ids"]
    assert {c.id for c in cases} <= set(val_ids), "sample cases must be held out from the model's training"


def test_demo_writes_segmentations_scene_renders_and_metrics(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    lines: list[str] = []
    report = run_demo(out, log=lines.append)
    card = read_model_card(default_model())
    # metrics against the manual labels: real segmentations, not noise (validation Dice of the model is ~0.88)
    for name, s in report["summary"].items():
        assert s["dice"]["mean"] > 0.75, (name, s)
        assert s["hd95"]["mean"] < 4.0, (name, s)
    assert json.loads((out / "metrics.json").read_text())["summary"] == report["summary"]
    assert any("Slicer scene" in line for line in lines)
    # renders exist and are not blank
    from PIL import Image

    for case in report["cases"]:
        assert len(case["renders"]) == 4
        for png in case["renders"]:
            pixels = np.asarray(Image.open(png).convert("RGB"), dtype=float)
            assert pixels.std() > 10, f"{png} looks blank"
    # the .mrb opens in a fresh scene with the volumes and both segmentations per case, names and terminology kept
    scene, app, _ = setup_headless()
    assert read_mrb(scene, app, out / "demo_scene.mrb", tmp_path / "cache")
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 3
    assert (out / MARKER).is_file()
    claim_output_folder(out)  # a second demo into this folder may replace these results
    segs = [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode") for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]
    assert len(segs) == 6
    model_seg = next(s for s in segs if s.GetName() == "hippocampus_015 DSD segmentation")
    segmentation = model_seg.GetSegmentation()
    for value, entry in card["preset"]["terminology"].items():
        segment = segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName(card["preset"]["labels"][value]))
        assert segment.GetTerminology() == tag_string(entry)
    scene.Clear(1)


def test_demo_never_writes_into_a_folder_of_the_users(tmp_path: Path) -> None:
    """A non-empty --output that an earlier demo did not write is refused before any work, every file unchanged."""
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "metrics.json").write_text("my own metrics")
    with pytest.raises(InputError, match="holds files that an earlier demo did not write"):
        run_demo(mine)
    assert [p.name for p in mine.iterdir()] == ["metrics.json"] and (mine / "metrics.json").read_text() == "my own metrics"
    assert main(["--output", str(mine / "metrics.json")]) == 2
    # a demo folder of a version before the marker (its demo.json report) is the demo's own
    (mine / "demo.json").write_text(json.dumps({"model": "m", "sample": "s", "cases": [], "scene": "x.mrb"}))
    claim_output_folder(mine)
    assert (mine / MARKER).is_file()
