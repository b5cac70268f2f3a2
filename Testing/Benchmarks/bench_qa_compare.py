#!/usr/bin/env python
"""How long QA Compare holds Slicer's main thread, against the whole comparison, on a BraTS-size case.

Usage:  .venv/bin/python Testing/Benchmarks/bench_qa_compare.py [--reps 3] [--case brats_2013_pat0001_1]

A real MRML scene (slicer-core, headless): the BraTS 2015 sample case's manual labels (240 x 240 x 155, 1 mm:
necrosis 1, edema 2, enhancing 4, as three segments) as the reference, and the same with the edema grown by 2
voxels as the segmentation to check. Since session 12 the panel's Compare runs in the warm worker
(``QALogic.start_compare`` / ``finish_compare``); the main thread only writes the masks and builds the nodes.
Printed per repetition: main-thread seconds in start (export + request) and finish (nodes), the wall time until the
result is in the scene (worker included, warm worker), and their ratio; median over the repetitions after the first
(the first includes the worker's imports). The session-11 code did everything on the main thread: 5.5 s on this
case then (cProfile, a shared core), the figure this is compared with in README.
"""

from __future__ import annotations

import argparse
import statistics
import time

import nibabel as nib
import numpy as np
from scipy import ndimage

from DSDSegmentationLib.bridge.headless import setup_headless  # noqa: E402

import slicer  # noqa: E402

from DSDSegmentationLib.bridge.logic import SegmentationBridge  # noqa: E402
from DSDSegmentationLib.bridge.qa_logic import QALogic  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data  # noqa: E402

NAMES = {1: "necrosis", 2: "edema", 4: "enhancing tumour"}


def segmentation(scene, volume, name: str, labels: np.ndarray):
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for value, segment in NAMES.items():
        sid = node.GetSegmentation().AddEmptySegment(segment, segment)
        slicer.util.updateSegmentBinaryLabelmapFromArray(
            np.ascontiguousarray((labels == value).astype(np.uint8).transpose(2, 1, 0)), node, sid, volume)
    return node


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--case", default="brats_2013_pat0001_1")
    args = ap.parse_args()
    scene, _app, _mods = setup_headless()
    data = find_shared_data() / "BraTS2015_DeepMedicSample"
    image = nib.load(data / "imagesTr" / f"{args.case}_0000.nii.gz")
    ref = np.rint(np.asanyarray(nib.load(data / "labelsTr" / f"{args.case}.nii.gz").dataobj)).astype(np.uint8)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "FLAIR")
    slicer.util.updateVolumeFromArray(volume, np.ascontiguousarray(np.asanyarray(image.dataobj).astype(np.float32).transpose(2, 1, 0)))
    pred = ref.copy()
    pred[ndimage.binary_dilation(ref == 2, iterations=2) & (ref == 0)] = 2
    seg, refn = segmentation(scene, volume, "model", pred), segmentation(scene, volume, "manual", ref)
    bridge = SegmentationBridge(scene, warm=True)
    qa = QALogic(scene, bridge)
    rows = []
    try:
        for rep in range(args.reps + 1):
            t0 = time.perf_counter()
            run = qa.start_compare(seg, refn, volume)
            t1 = time.perf_counter()
            while run.worker.running:
                run.worker.poll()
                time.sleep(0.01)
            t2 = time.perf_counter()
            result = qa.finish_compare(run)
            t3 = time.perf_counter()
            main_s, wall_s = (t1 - t0) + (t3 - t2), t3 - t0
            print(f"rep {rep}{' (cold worker)' if rep == 0 else ''}: main thread {t1 - t0:.2f} s start + {t3 - t2:.2f} s "
                  f"finish = {main_s:.2f} s of {wall_s:.2f} s wall ({main_s / wall_s:.2f}); "
                  "Dice " + ", ".join(f"{n} {m['dice']:.3f}" for n, m in result.metrics.items()))
            if rep:
                rows.append((main_s, wall_s))
            qa.restore_display(result.display_before)
    finally:
        bridge.shutdown()
    main_s, wall_s = statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows)
    print(f"median of {len(rows)} warm: main thread {main_s:.2f} s, wall {wall_s:.2f} s, ratio {main_s / wall_s:.2f}")


if __name__ == "__main__":
    main()
