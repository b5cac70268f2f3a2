#!/usr/bin/env python
"""Where a cardiac model errs along the long axis: Dice per class by slice position, base to apex.

Usage:  .venv/bin/python Testing/Benchmarks/bench_cardiac_slices.py [--model Resources/Models/cardiac-dsd]

The model card's validation volumes (ACDC, ED and ES of its validation patients) from ../shared/data, predicted on
their original grids. Each labelled slice gets its position between the first (0) and the last (1) slice that holds
any label; in ACDC slice 0 is basal (the reference's right ventricle is ~6x larger there than at the last slices).
Printed per class and third of the stack (basal 0-0.2, middle 0.2-0.8, apical 0.8-1): the number of slices, the
mean per-slice Dice, the reference voxels and the share of the class's whole volume error |pred - ref| (voxels,
summed over slices) that lies there.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np

from DSDSegmentationLib.engine.data import find_shared_data, list_cases  # noqa: E402
from DSDSegmentationLib.engine.inference import Predictor  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BANDS = (("basal", 0.0, 0.2), ("middle", 0.2, 0.8), ("apical", 0.8, 1.01))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "cardiac-dsd"))
    args = ap.parse_args()
    card = json.loads((Path(args.model) / "model.json").read_text())
    val = set(card["split"]["val_ids"])
    labels = {int(k): v for k, v in card["preset"]["labels"].items() if int(k)}
    cases = [c for c in list_cases(find_shared_data() / "ACDC_subset") if c.id in val]
    predictor = Predictor(args.model, device="cpu")
    rows = []  # (class, position, slice Dice, reference voxels, |pred - ref| voxels)
    for case in cases:
        pred, _ = predictor.predict(case.images)
        ref = np.rint(np.asanyarray(nib.load(case.label).dataobj)).astype(int)
        labelled = [k for k in range(ref.shape[2]) if (ref[..., k] > 0).any()]
        for k in labelled:
            pos = (k - labelled[0]) / max(len(labelled) - 1, 1)
            for value in labels:
                p, r = pred[..., k] == value, ref[..., k] == value
                if p.any() or r.any():
                    rows.append((value, pos, 2 * (p & r).sum() / (p.sum() + r.sum()), int(r.sum()), abs(int(p.sum()) - int(r.sum()))))
    print(f"# {card['id']} {card['version']}: {len(cases)} validation volumes, per-slice Dice by position (0 = base)")
    print("| class | band | slices | mean slice Dice | reference voxels | share of the volume error |")
    print("|---|---|---:|---:|---:|---:|")
    for value, name in labels.items():
        mine = [r for r in rows if r[0] == value]
        total = sum(r[4] for r in mine) or 1
        for band, lo, hi in BANDS:
            sel = [r for r in mine if lo <= r[1] < hi]
            print(f"| {name} | {band} | {len(sel)} | {np.mean([r[2] for r in sel]):.3f} | {sum(r[3] for r in sel)} | "
                  f"{100 * sum(r[4] for r in sel) / total:.0f} % |")


if __name__ == "__main__":
    main()
