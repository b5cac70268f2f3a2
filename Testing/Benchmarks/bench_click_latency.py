#!/usr/bin/env python
"""Warm click → segment latency (headless Logic, CPU): crop around the click, worker inference, paste into the
full-grid segmentation. Hippocampus: a real MSD case embedded in a 160x160x120 volume (a whole-head-sized grid),
clicked at its hippocampus; cardiac: an ACDC volume with an ROI of the cardiac model's field of view around the heart,
compared with the same model on the whole volume.

Usage:  .venv/bin/python Testing/Benchmarks/bench_click_latency.py [--reps 7] [--cardiac-models PKG [PKG ...]]
            [--skip-hippocampus]   (several cardiac packages are timed side by side, in the same process)
Target: hippocampus <= 1 s warm.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import vtk

from DSDSegmentationLib.bridge.headless import setup_headless  # noqa: I001  (sets up slicer-core first)
import slicer

from DSDSegmentationLib.engine.cards import builtin_models_dir
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.bridge.interactive import InteractiveLogic
from DSDSegmentationLib.bridge.logic import SegmentationBridge


def timed(fn, reps: int) -> tuple[float, float]:
    cold_t0 = time.perf_counter()
    fn()
    cold = time.perf_counter() - cold_t0
    warm = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        warm.append(time.perf_counter() - t0)
    return cold, statistics.median(warm)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--cardiac-models", nargs="+", default=[str(builtin_models_dir() / "cardiac-dsd")],
                    help="cardiac packages to time side by side (default: the shipped one)")
    ap.add_argument("--skip-hippocampus", action="store_true")
    args = ap.parse_args()
    data = find_shared_data()
    rows = []
    scene, _app, _ = setup_headless()
    bridge = SegmentationBridge(scene, warm=True)
    inter = InteractiveLogic(bridge)
    try:
        # hippocampus: embed hippocampus_015 in a large noisy volume
        hippocampus = not args.skip_hippocampus
        img = nib.load(data / "Task04_Hippocampus" / "imagesTr" / "hippocampus_015.nii.gz")
        lab = np.rint(np.asanyarray(nib.load(data / "Task04_Hippocampus" / "labelsTr" / "hippocampus_015.nii.gz").dataobj))
        x = np.asanyarray(img.dataobj).astype(np.float32)
        big = (np.median(x) + np.random.default_rng(0).normal(0, 10, (160, 160, 120))).astype(np.float32)
        o = (90, 60, 40)
        big[o[0]:o[0] + x.shape[0], o[1]:o[1] + x.shape[1], o[2]:o[2] + x.shape[2]] = x
        vol = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "head")
        slicer.util.updateVolumeFromArray(vol, np.ascontiguousarray(big.transpose(2, 1, 0)))
        c = np.argwhere(lab > 0).mean(0) + np.array(o)
        click = [float(v) for v in c]  # identity IJKToRAS
        model = builtin_models_dir() / "hippocampus-dsd"
        if hippocampus:
            seg, _ = inter.segment_at(vol, model, click, device="cpu")
            cold, warm = timed(lambda: inter.segment_at(vol, model, click, segmentation_node=seg, device="cpu"), args.reps)
            rows.append(("hippocampus click", "x".join(map(str, big.shape)), cold, warm))
        # cardiac: ROI around the heart vs the whole volume, each package in turn
        for model in map(Path, args.cardiac_models):
            if not model.is_dir():
                continue
            version = json.loads((model / "model.json").read_text()).get("version", "?")
            (case,) = [c for c in list_cases(data / "ACDC_subset") if c.id == "patient005_frame01"]
            vol = bridge.load_volume(case.images[0])
            lab = np.rint(np.asanyarray(nib.load(case.label).dataobj))
            ijk = np.argwhere(lab > 0).mean(0)
            mat = vtk.vtkMatrix4x4()
            vol.GetIJKToRASMatrix(mat)
            m = slicer.util.arrayFromVTKMatrix(mat)
            centre = list((m @ np.array([*ijk, 1.0]))[:3])
            seg, _ = inter.segment_at(vol, model, centre, device="cpu")
            cold, warm = timed(lambda: inter.segment_at(vol, model, centre, segmentation_node=seg, device="cpu"), args.reps)
            dims = vol.GetImageData().GetDimensions()
            rows.append((f"cardiac {version} ROI (card field of view)", "x".join(map(str, dims)), cold, warm))
            cold, warm = timed(lambda: bridge.segment([vol], model, device="cpu"), args.reps)
            rows.append((f"cardiac {version} whole volume", "x".join(map(str, dims)), cold, warm))
    finally:
        bridge.shutdown()
    print(f"# CPU only, warm worker; median of {args.reps} warm runs (the first run of each row is the 'first' column)")
    print("| prompt | volume | first (s) | warm (s) |")
    print("|---|---|---:|---:|")
    for name, dims, cold, warm in rows:
        print(f"| {name} | {dims} | {cold:.2f} | {warm:.2f} |")


if __name__ == "__main__":
    main()
