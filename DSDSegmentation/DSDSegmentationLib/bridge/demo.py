"""The README's main command: the bundled hippocampus model segments the bundled sample MRI through the Slicer
module's own Logic on a real MRML scene (slicer-core, no Qt), and everything a researcher would look at is written
to one folder: ``.seg.nrrd`` files, a Slicer scene (``.mrb``), PNG renders and Dice/HD95 against the manual labels.

Usage:  python -m DSDSegmentationLib.bridge.demo [--output output/demo] [--model DIR] [--sample DIR] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

from ..engine.cards import read_model_card, resources_dir  # noqa: E402
from ..engine.data import list_cases  # noqa: E402
from ..engine.errors import DSDError, InputError  # noqa: E402
from ..engine.metrics import evaluate_files, format_summary, write_reports  # noqa: E402


def default_model() -> Path:
    return resources_dir() / "Models" / "hippocampus-dsd"


def default_sample() -> Path:
    return resources_dir() / "SampleData" / "Hippocampus"


MARKER = ".dsdseg-demo"  # written first into the output folder: the demo may replace what an earlier demo wrote there


def _earlier_report(path: Path) -> bool:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(report, dict) and {"model", "sample", "cases", "scene"} <= report.keys()


def claim_output_folder(out: Path) -> None:
    """The demo writes into a new or empty folder, or over an earlier demo's results (its marker file); a folder
    with anything else in it is refused before any work, so no file of the user's is replaced."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out} is a file; the demo needs a folder")
    earlier = (out / MARKER).is_file() or _earlier_report(out / "demo.json")  # demo.json: demos before the marker
    if out.is_dir() and any(out.iterdir()) and not earlier:
        raise InputError(f"--output {out} holds files that an earlier demo did not write; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by DSDSegmentationLib.bridge.demo; the demo may replace this folder's results\n",
                              encoding="utf-8")


def run_demo(output: str | Path, model: str | Path | None = None, sample: str | Path | None = None,
             device: str = "cpu", log=print) -> dict[str, Any]:
    """Segment every sample case, write the results, return a summary (paths, seconds, metrics)."""
    import vtk

    from .headless import setup_headless
    from .logic import SegmentationBridge
    from .rendering import render_3d, render_slice

    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_WARNING)
    out = Path(output).resolve()  # the scene bundle writer needs absolute paths
    model = Path(model or default_model())
    sample = Path(sample or default_sample())
    card = read_model_card(model)
    preset = card["preset"]
    cases = list_cases(sample)
    claim_output_folder(out)
    for sub in ("segmentations", "labels", "renders"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    scene, app, _mods = setup_headless()
    logic = SegmentationBridge(scene, warm=True)
    timings, pairs, results = [], [], []
    try:
        for case in cases:
            volume = logic.load_volume(case.images[0], name=case.id)
            t0 = time.perf_counter()
            seg = logic.segment([volume], model, device=device)
            seconds = time.perf_counter() - t0
            timings.append(seconds)
            seg.SetName(f"{case.id} DSD segmentation")
            seg_file = logic.save_segmentation(seg, out / "segmentations" / f"{case.id}.seg.nrrd")
            label_file = logic.export_labelmap(seg, volume, preset, out / "labels" / f"{case.id}.nii.gz")
            pairs.append((case.id, str(label_file), case.label))
            reference = logic.import_labelmap(case.label, volume, preset, show_3d=False)
            reference.SetName(f"{case.id} manual reference")
            logic.save_segmentation(reference, out / "segmentations" / f"{case.id}_reference.seg.nrrd")
            reference.GetDisplayNode().SetVisibility(False)  # in the scene for comparison, off in the renders
            for other in _segmentations(scene):
                if other is not seg and other is not reference:
                    other.GetDisplayNode().SetVisibility(False)
            seg.GetDisplayNode().SetVisibility(True)
            renders = [render_slice(scene, app, volume, seg, out / "renders" / f"{case.id}_{o.lower()}.png", orientation=o)
                       for o in ("Axial", "Coronal", "Sagittal")]
            renders.append(render_3d(scene, app, seg, out / "renders" / f"{case.id}_3d.png"))
            results.append({"case": case.id, "seconds": round(seconds, 3), "segmentation": str(seg_file),
                            "labelmap": str(label_file), "renders": [str(r) for r in renders]})
            kind = "cold: worker start + model load + inference + import" if len(timings) == 1 else "warm"
            log(f"{case.id}: segmented in {seconds:.2f} s ({kind}) -> {seg_file}")
        rows = evaluate_files(pairs, {int(k): v for k, v in preset["labels"].items()})
        summary = write_reports(rows, out)
        for node in _segmentations(scene):
            node.GetDisplayNode().SetVisibility(True)
        mrb = out / "demo_scene.mrb"
        if not scene.WriteToMRB(str(mrb)):
            raise DSDError(f"could not write the scene {mrb}")
    finally:
        logic.shutdown()
        scene.Clear(1)
    report = {"model": str(model), "sample": str(sample), "device": device, "cases": results, "scene": str(mrb),
              "metrics": str(out / "metrics.json"), "summary": summary,
              "licence": card.get("licence", {}).get("text", "see the model card")}
    (out / "demo.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    log("")
    log(f"Dice / HD95 against the manual labels ({len(rows)} sample cases, not used in training):")
    log(format_summary(summary))
    log("")
    log(f"segmentations (.seg.nrrd): {out / 'segmentations'}")
    log(f"labelmaps on the input grids: {out / 'labels'}")
    log(f"renders (slices with outlines, 3D surfaces): {out / 'renders'}")
    log(f"Slicer scene (volumes, model and manual segmentations): {mrb}")
    log(f"metrics: {out / 'metrics.json'}, {out / 'metrics.csv'}")
    return report


def _segmentations(scene: Any) -> list[Any]:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSegmentationNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode"))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default="output/demo")
    ap.add_argument("--model", help=f"model package or run folder (default: {default_model()})")
    ap.add_argument("--sample", help=f"MSD-layout folder with images and labels (default: {default_sample()})")
    ap.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"])
    args = ap.parse_args(argv)
    try:
        run_demo(args.output, args.model, args.sample, args.device)
    except DSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
