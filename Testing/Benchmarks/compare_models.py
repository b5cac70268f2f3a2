#!/usr/bin/env python
"""Two model packages on the same validation cases: Dice per class (and region), paired per case (Wilcoxon).

Usage:  .venv/bin/python Testing/Benchmarks/compare_models.py OLD_PACKAGE NEW_PACKAGE
e.g. the shipped model before and after a retraining (git show / a copy of the old folder):
        ... compare_models.py /tmp/cardiac-2.0.0 Resources/Models/cardiac-dsd
        ... compare_models.py Resources/Models/cardiac-dsd Resources/Models/cardiac-dsd --tta-new   (what flips bring)

The cases are the NEW card's validation ids (both cards must list the same ones: otherwise the comparison would not
be paired and the script stops), read from ../shared/data; each prediction is scored on the case's original grid by
the same code as ``dsdseg evaluate``. Cases of one patient (e.g. ED and ES frames) are not independent: read p as
indicative.
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
from DSDSegmentationLib.engine.metrics import evaluate_files  # noqa: E402


def per_case_dice(package: Path, cases, tmp: Path, tta: bool = False) -> dict[str, dict[str, float]]:
    """{class name: {case id: Dice}}, the mean of the classes under "mean", then the preset's regions (e.g. BraTS
    whole tumour / tumour core / enhancing tumour) under their names."""
    predictor = Predictor(package, device="cpu", tta=tta)
    pairs = []
    for c in cases:
        out = tmp / f"{package.name}-{int(tta)}-{c.id}.nii.gz"
        predictor.predict_to_file(c.images, out)
        pairs.append((c.id, str(out), c.label))
    preset = predictor.model.preset
    rows = evaluate_files(pairs, preset.labels, preset.regions)
    names = [n for v, n in sorted(preset.labels.items()) if v]
    table = {n: {r["case"]: r["classes"][n]["dice"] for r in rows} for n in names}
    table["mean"] = {r["case"]: float(np.mean([r["classes"][n]["dice"] for n in names])) for r in rows}
    for region in preset.regions or {}:
        table[f"region {region}"] = {r["case"]: r["classes"][region]["dice"] for r in rows}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--tta-old", action="store_true", help="OLD averages over flips (8x slower)")
    ap.add_argument("--tta-new", action="store_true", help="NEW averages over flips; OLD = NEW with --tta-new "
                    "measures what flip averaging brings")
    args = ap.parse_args()
    old, new = read_model_card(args.old), read_model_card(args.new)
    if old["task"] != new["task"]:
        raise SystemExit(f"different tasks: {old['task']} and {new['task']}")
    ids = set(new["split"]["val_ids"])
    if set(old["split"]["val_ids"]) != ids:
        raise SystemExit("the two cards list different validation cases: no paired comparison")
    folder = find_shared_data() / FOLDERS[new["task"]]
    cases = [c for c in list_cases(folder, channels=new["preset"]["channels"]) if c.id in ids]
    if len(cases) != len(ids):
        raise SystemExit(f"found {len(cases)} of the card's {len(ids)} validation cases in {folder}")
    with tempfile.TemporaryDirectory() as tmp:
        a, b = (per_case_dice(p, cases, Path(tmp), t) for p, t in ((args.old, args.tta_old), (args.new, args.tta_new)))
    va, vb = (card.get("version", name) + (" +TTA" if t else "")
              for card, name, t in ((old, "old", args.tta_old), (new, "new", args.tta_new)))
    print(f"# {new['id']}: {va} vs {vb} on {len(cases)} validation cases; Dice per class, paired {vb} - {va}")
    print(f"| class | {va} | {vb} | {vb} − {va} | {vb} better |")
    print("|---|---:|---:|---|---:|")
    for name in a:
        diff = paired_difference([{"seed": 0, "dice": b[name]}], [{"seed": 0, "dice": a[name]}], digits=2)
        better = sum(b[name][k] > a[name][k] for k in a[name])
        print(f"| {name} | {np.mean(list(a[name].values())):.4f} | {np.mean(list(b[name].values())):.4f} | {diff} "
              f"| {better}/{len(a[name])} |")


if __name__ == "__main__":
    main()
