#!/usr/bin/env python
"""Does keeping the largest connected component help a model? Measured on its own validation cases (paired).

Usage:  .venv/bin/python Testing/Benchmarks/bench_postprocessing.py Resources/Models/cardiac-dsd

Predicts each of the card's validation cases once (original files, the card's preprocessing, no post-processing),
then scores on each case's original grid: the raw labels, the largest component of the foreground, and the largest
component of each label. Prints Dice and HD95 per label (and region) with the paired
per-case difference against the raw labels (Wilcoxon). nnU-Net keeps such a step only where it raises the
validation Dice; measured in session 8 for the three tasks, it did not (README, *Post-processing*), so the product
has none.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from package_model import FOLDERS  # noqa: E402
from paired_stats import paired_difference  # noqa: E402

from DSDSegmentationLib.engine.cards import read_model_card  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data, list_cases  # noqa: E402
from DSDSegmentationLib.engine.inference import Predictor  # noqa: E402
from DSDSegmentationLib.engine.io import load_volume, save_labelmap  # noqa: E402
from DSDSegmentationLib.engine.metrics import evaluate_files  # noqa: E402
from DSDSegmentationLib.engine.postprocess import keep_largest_component  # noqa: E402


VARIANTS = {"raw": None, "largest component of the foreground": "foreground",
            "largest component of each label": "per_label"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--cases", type=int, default=0, help="only the first N validation cases (0: all)")
    a = ap.parse_args()
    card = read_model_card(a.model)
    ids = card["split"]["val_ids"]
    cases = [c for c in list_cases(find_shared_data() / FOLDERS[card["task"]], channels=card["preset"]["channels"])
             if c.id in set(ids)]
    cases = cases[:a.cases] if a.cases else cases
    predictor = Predictor(a.model, device="cpu")
    labels = predictor.model.preset.labels
    regions = card["preset"].get("regions") or None
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        raw_files = []
        for c in cases:
            out = Path(tmp) / f"raw-{c.id}.nii.gz"
            predictor.predict_to_file(c.images, out)
            raw_files.append(out)
        for name, mode in VARIANTS.items():
            pairs = []
            for c, f in zip(cases, raw_files):
                if mode is None:
                    pairs.append((c.id, str(f), c.label))
                    continue
                lab, aff = load_volume(f)
                out = Path(tmp) / f"{mode}-{c.id}.nii.gz"
                save_labelmap(keep_largest_component(np.rint(lab).astype(np.int16), mode), aff, out, reference=f)
                pairs.append((c.id, str(out), c.label))
            rows[name] = evaluate_files(pairs, labels, regions)
    names = list(rows["raw"][0]["classes"])
    print(f"# {card['id']} {card.get('version')}: {len(cases)} validation cases, original grids")
    print("| post-processing | " + " | ".join(f"{n} Dice / HD95" for n in names) + " | mean Dice − raw (paired) |")
    print("|---|" + "---|" * (len(names) + 1))
    def per_case(rs):  # one record per case: the mean Dice of the labels, for paired_difference
        return [{"seed": 0, "dice": {r["case"]: np.mean([r["classes"][n]["dice"] for n in labels.values()
                                                         if n in r["classes"]]) for r in rs}}]

    base = per_case(rows["raw"])
    for name, rs in rows.items():
        cells = []
        for n in names:
            d = np.mean([r["classes"][n]["dice"] for r in rs])
            h = [r["classes"][n]["hd95"] for r in rs if r["classes"][n]["hd95"] is not None]
            cells.append(f"{d:.4f} / {np.mean(h):.2f}" if h else f"{d:.4f} / –")
        diff = "–" if name == "raw" else paired_difference(per_case(rs), base, digits=2)
        print(f"| {name} | " + " | ".join(cells) + f" | {diff} |")


if __name__ == "__main__":
    main()
