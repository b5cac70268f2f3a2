#!/usr/bin/env python
"""Headless equivalent of click → segments: worker start + model load + inference + import into MRML,
cold (first run, new worker) and warm (worker and model loaded), on a real hippocampus, a cardiac and a four-sequence
brain-tumour case.

Usage:  .venv/bin/python Testing/Benchmarks/bench_logic_latency.py [--hippocampus-model M] [--cardiac-model M]
            [--brain-tumour-model M] [--reps 3] [--tasks hippocampus cardiac brain_tumour]
Default models: the shipped packages in Resources/Models (hippocampus-dsd, cardiac-dsd, brain-tumour-dsd when it takes
the four sequences); where one is missing, a tiny one of the same preset is trained first (latency does not depend on
how well a model is trained; a training run folder is also accepted as a model).
The brain-tumour case is BraTS 2018 case Brats18_2013_11_1 brought to the 1 mm BraTS grid (240 x 240 x 155,
trilinear), four volumes FLAIR, T1, T1c, T2, as a Slicer user would load them.
Targets: hippocampus <= 5 s cold and <= 1 s warm; cardiac <= 10 s cold, <= 5 s warm; brain tumour (240 x 240 x 155)
<= 30 s cold, <= 10 s warm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from DSDSegmentationLib.bridge.headless import setup_headless  # noqa: E402

import slicer  # noqa: E402

from DSDSegmentationLib.worker.cli import main as cli  # noqa: E402
from DSDSegmentationLib.engine.cards import builtin_models_dir  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data, list_cases  # noqa: E402
from DSDSegmentationLib.bridge.logic import SegmentationBridge  # noqa: E402


def tiny_model(task: str, data: Path, out: Path) -> Path:
    assert cli(["train", "--task", task, "--data", str(data), "--output", str(out), "--epochs", "1", "--max-cases", "4",
                "--max-steps", "1", "--progress", "none"]) == 0
    return out


def brats_1mm(case, out: Path) -> list[str]:
    """The four 2 mm BraTS 2018 volumes of ``case`` on a 1 mm 240 x 240 x 155 grid (same physical extent)."""
    import nibabel as nib
    import torch

    paths = []
    for i, src in enumerate(case.images):
        img = nib.load(src)
        data = torch.from_numpy(np.asarray(img.dataobj, dtype=np.float32))[None, None]
        up = torch.nn.functional.interpolate(data, size=(240, 240, 155), mode="trilinear", align_corners=False)[0, 0]
        affine = img.affine.copy()
        zoom = np.diag(affine[:3, :3]) / 2.0  # signed 1 mm steps
        affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ np.full(3, -0.25)  # first 1 mm voxel centre
        affine[:3, :3] = np.diag(zoom)
        path = out / f"{case.id}_1mm_{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(up.numpy(), affine), str(path))
        paths.append(str(path))
    return paths


def load_node(scene, path: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", Path(path).name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(path)
    assert storage.ReadData(node)
    return node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hippocampus-model")
    ap.add_argument("--cardiac-model")
    ap.add_argument("--brain-tumour-model")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tasks", nargs="+", default=["hippocampus", "cardiac", "brain_tumour"])
    args = ap.parse_args()
    data = find_shared_data()
    tmp = Path(tempfile.mkdtemp(prefix="dsdseg-bench-"))
    rows = []
    for task, folder, model, case_id in (("hippocampus", "Task04_Hippocampus", args.hippocampus_model, "hippocampus_001"),
                                         ("cardiac", "ACDC_subset", args.cardiac_model, "patient005_frame01"),
                                         ("brain_tumour", "BraTS2018_2mm", args.brain_tumour_model, "Brats18_2013_11_1")):
        if task not in args.tasks:
            continue
        shipped = builtin_models_dir() / f"{task.replace('_', '-')}-dsd"
        usable = shipped.is_dir() and (task != "brain_tumour"  # the demonstration model takes FLAIR + T1c only
                                       or len(json.loads((shipped / "model.json").read_text())["inputs"]) == 4)
        model = Path(model) if model else shipped if usable else tiny_model(task, data / folder, tmp / task)
        print(f"{task}: model {model}")
        (case,) = [c for c in list_cases(data / folder) if c.id == case_id]
        images = brats_1mm(case, tmp) if task == "brain_tumour" else case.images
        scene, _app, _mods = setup_headless()
        nodes = [load_node(scene, path) for path in images]
        dims = nodes[0].GetImageData().GetDimensions()
        colds, warms, blocked = [], [], {"start": [], "finish": []}

        def timed_segment(logic: SegmentationBridge) -> float:
            """One Apply as the panel makes it: start (inputs written, worker asked) and finish (labelmap imported
            into segments) run in Slicer's main thread and block its UI; the worker's time between them does not."""
            t0 = time.perf_counter()
            run = logic.start(nodes, model, device="cpu")
            t1 = time.perf_counter()
            while run.worker.running:
                run.worker.poll()
                time.sleep(0.01)
            t2 = time.perf_counter()
            logic.finish(run)
            t3 = time.perf_counter()
            blocked["start"].append(t1 - t0)
            blocked["finish"].append(t3 - t2)
            return t3 - t0

        for _ in range(args.reps):
            logic = SegmentationBridge(scene, temp_root=tmp)
            colds.append(timed_segment(logic))
            for _ in range(args.reps):
                warms.append(timed_segment(logic))
            logic.shutdown()
        rows.append((task if len(nodes) == 1 else f"{task} ({len(nodes)} sequences)", "x".join(map(str, dims)),
                     statistics.median(colds), statistics.median(warms), statistics.median(blocked["start"]),
                     statistics.median(blocked["finish"]), max(a + b for a, b in zip(blocked["start"], blocked["finish"]))))
        scene.Clear(1)
    print(f"# CPU only, median of {args.reps} cold and {args.reps * args.reps} warm runs; headless slicer-core scene; "
          "main thread = what blocks Slicer's UI (writing the inputs, importing the result)")
    print("| case | volume | cold (s) | warm (s) | main thread: start (s) | main thread: import (s) | main thread, worst run (s) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for task, dims, cold, warm, start, finish, worst in rows:
        print(f"| {task} | {dims} | {cold:.2f} | {warm:.2f} | {start:.2f} | {finish:.2f} | {worst:.2f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
