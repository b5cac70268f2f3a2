#!/usr/bin/env python
"""How well must a multi-sequence model's inputs be registered? Dice when one sequence is misregistered by a few mm.

Usage:  .venv/bin/python Testing/Benchmarks/bench_misregistration.py [--model Resources/Models/brain-tumour-dsd]
            [--sequence T1c] [--shifts 0 1 2 4] [--axis 0]

The card's validation cases from ../shared/data. One input sequence (``--sequence``, a channel name of the card) is
given with its header translated by each shift (mm, along world axis ``--axis``): the engine places every further
sequence where its header says, on the first sequence's grid, so the model sees it displaced by that much against
the others — a registration off by that distance. Everything else is the case as stored. Printed: mean Dice per
label and region at each shift, and the paired change against no shift (Wilcoxon over the cases; few cases: read p
as indicative).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from package_model import FOLDERS
from paired_stats import paired_difference

from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "brain-tumour-dsd"))
    ap.add_argument("--sequence", default="T1c", help="the channel (as the card names it) to misregister")
    ap.add_argument("--shifts", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--axis", type=int, default=0, choices=[0, 1, 2], help="world axis of the shift (0 = x)")
    args = ap.parse_args()
    card = json.loads((Path(args.model) / "model.json").read_text(encoding="utf-8"))
    channels = list(card["preset"]["channels"])
    if args.sequence not in channels[1:]:
        raise SystemExit(f"--sequence must be one of the further inputs {channels[1:]} (the first one is the grid)")
    index = channels.index(args.sequence)
    folder = find_shared_data() / FOLDERS[card["task"]]
    ids = set(card["split"]["val_ids"])
    cases = [c for c in list_cases(folder, channels=channels) if c.id in ids]
    labels = {int(k): v for k, v in card["preset"]["labels"].items()}
    regions = card["preset"].get("regions") or {}
    predictor = Predictor(args.model, device="cpu")
    table: dict[float, dict[str, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for shift in args.shifts:
            pairs = []
            for case in cases:
                images = list(case.images)
                if shift:
                    img = nib.load(images[index])
                    affine = img.affine.copy()
                    affine[args.axis, 3] += shift
                    moved = Path(tmp) / f"{case.id}_{args.sequence}_{shift:g}.nii.gz"
                    nib.save(nib.Nifti1Image(np.asanyarray(img.dataobj), affine, img.header), moved)
                    images[index] = str(moved)
                out = Path(tmp) / f"{case.id}_seg_{shift:g}.nii.gz"
                predictor.predict_to_file(images, out)
                pairs.append((case.id, str(out), case.label))
            rows = evaluate_files(pairs, labels, regions)
            names = [n for v, n in sorted(labels.items()) if v] + list(regions)
            table[shift] = {n: {r["case"]: r["classes"][n]["dice"] for r in rows} for n in names}
            print(f"shift {shift:g} mm: " + ", ".join(f"{n} {np.mean(list(d.values())):.3f}"
                                                    for n, d in table[shift].items()), flush=True)
    base = args.shifts[0]
    print(f"\n# {card['id']} {card.get('version', '')}: {args.sequence} displaced along axis {args.axis} against the "
          f"other inputs, {len(cases)} validation cases; mean Dice (paired change against {base:g} mm)")
    names = list(table[base])
    print("| shift (mm) | " + " | ".join(names) + " |")
    print("|---:|" + "---:|" * len(names))
    for shift in args.shifts:
        cells = []
        for n in names:
            mean = np.mean(list(table[shift][n].values()))
            if shift == base:
                cells.append(f"{mean:.3f}")
            else:
                diff = paired_difference([{"seed": 0, "dice": table[shift][n]}], [{"seed": 0, "dice": table[base][n]}],
                                         digits=2)
                cells.append(f"{mean:.3f} ({diff})")
        print(f"| {shift:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
