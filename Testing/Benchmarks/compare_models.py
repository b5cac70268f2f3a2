#!/usr/bin/env python
"""Two model packages on the same validation cases: Dice per class, paired per case (Wilcoxon).

Usage:  .venv/bin/python Testing/Benchmarks/compare_models.py OLD_PACKAGE NEW_PACKAGE
e.g. the shipped model before and after a retraining (git show / a copy of the old folder):
        ... compare_models.py /tmp/cardiac-2.0.0 Resources/Models/cardiac-dsd

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


def per_case_dice(package: Path, cases, tmp: Path) -> dict[str, dict[str, float]]:
    """{class name: {case id: Dice}} and the mean of the classes under "mean"."""
    predictor = Predictor(package, device="cpu")
    pairs = []
    for c in cases:
        out = tmp / f"{package.name}-{c.id}.nii.gz"
        predictor.predict_to_file(c.images, out)
        pairs.append((c.id, str(out), c.label))
    rows = evaluate_files(pairs, predictor.model.preset.labels)
    names = [n for v, n in sorted(predictor.model.preset.labels.items()) if v]
    table = {n: {r["case"]: r["classes"][n]["dice"] for r in rows} for n in names}
    table["mean"] = {r["case"]: float(np.mean([r["classes"][n]["dice"] for n in names])) for r in rows}
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
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
        a, b = (per_case_dice(p, cases, Path(tmp)) for p in (args.old, args.new))
    va, vb = old.get("version", "old"), new.get("version", "new")
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
