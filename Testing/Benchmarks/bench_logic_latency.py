#!/usr/bin/env python
"""Headless equivalent of click → segments: worker start + model load + inference + import into MRML,
cold (first run, new worker) and warm (worker and model loaded), on a real hippocampus and a cardiac case.

Usage:  .venv/bin/python Testing/Benchmarks/bench_logic_latency.py [--hippocampus-model M] [--cardiac-model M] [--reps 3]
Default models: the shipped packages in Resources/Models (hippocampus-dsd, cardiac-dsd); where one is missing, a
tiny one of the same preset is trained first (latency does not depend on how well a model is trained).
Targets: hippocampus <= 5 s cold and <= 1 s warm; cardiac <= 10 s cold.
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    data = find_shared_data()
    tmp = Path(tempfile.mkdtemp(prefix="dsdseg-bench-"))
    rows = []
    for task, folder, model, case_id in (("hippocampus", "Task04_Hippocampus", args.hippocampus_model, "hippocampus_001"),
                                         ("cardiac", "ACDC_subset", args.cardiac_model, "patient005_frame01")):
        shipped = builtin_models_dir() / f"{task}-dsd"
        model = Path(model) if model else shipped if shipped.is_dir() else tiny_model(task, data / folder, tmp / task)
        print(f"{task}: model {model}")
        (case,) = [c for c in list_cases(data / folder) if c.id == case_id]
        scene, _app, _mods = setup_headless()
        node = load_node(scene, case.images[0])
        dims = node.GetImageData().GetDimensions()
        colds, warms = [], []
        for _ in range(args.reps):
            logic = SegmentationBridge(scene, temp_root=tmp)
            t0 = time.perf_counter()
            logic.segment([node], model, device="cpu")
            colds.append(time.perf_counter() - t0)
            for _ in range(args.reps):
                t0 = time.perf_counter()
                logic.segment([node], model, device="cpu")
                warms.append(time.perf_counter() - t0)
            logic.shutdown()
        rows.append((task, "x".join(map(str, dims)), statistics.median(colds), statistics.median(warms)))
        scene.Clear(1)
    print(f"# CPU only, median of {args.reps} cold and {args.reps * args.reps} warm runs; headless slicer-core scene")
    print("| case | volume | cold (s) | warm (s) |")
    print("|---|---|---:|---:|")
    for task, dims, cold, warm in rows:
        print(f"| {task} | {dims} | {cold:.2f} | {warm:.2f} |")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
