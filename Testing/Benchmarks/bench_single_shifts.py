#!/usr/bin/env python
"""Hippocampus models under each single simulated shift: contrast (T2-like), gamma, bias field, thick slices, noise.

Usage:  .venv/bin/python Testing/Benchmarks/bench_single_shifts.py --model A [B ...] [--names a b] [--cases 42]

The shifts are the parts of ``bench_finetune_domain_shift.shift_image`` (same deterministic draws per case), each
alone, then all four together; plus gamma alone (1.5 and 1/1.5 on the intensities scaled to [0, 1], no
inversion), which the combined shift does not use. Cases: the validation cases of the first model (its card's ``split.val_ids`` or its
run's ``split.json``); every other model must have been validated on the same cases (checked), so no model is
scored on images it was trained on. Prints mean Dice (anterior, posterior, mean) per model and condition.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_finetune_domain_shift import SHIFTS, shift_image  # noqa: E402

from DSDSegmentationLib.engine.cards import read_model_card  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data, list_cases  # noqa: E402
from DSDSegmentationLib.engine.inference import Predictor  # noqa: E402
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize  # noqa: E402

LABELS = {0: "background", 1: "anterior hippocampus", 2: "posterior hippocampus"}
CONDITIONS = ([("none", ())] + [(s, (s,)) for s in SHIFTS] + [("gamma 1.5", ("gamma",)), ("gamma 0.67", ("gamma_low",))]
              + [("all four", SHIFTS)])


def val_ids(model: Path) -> list[str]:
    split = model / "split.json"
    if split.is_file():
        return [c["id"] for c in json.loads(split.read_text())["val"]]
    return list(read_model_card(model)["split"]["val_ids"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True)
    ap.add_argument("--names", nargs="+")
    ap.add_argument("--cases", type=int, default=42, help="the first N validation cases")
    args = ap.parse_args()
    models = [Path(m).expanduser() for m in args.model]
    names = args.names or [m.name for m in models]
    ids = val_ids(models[0])[:args.cases]
    for m in models[1:]:
        missing = set(ids) - set(val_ids(m))
        if missing:
            raise SystemExit(f"{m} was not validated on {sorted(missing)[:3]}…: it may have trained on them")
    by_id = {c.id: c for c in list_cases(find_shared_data() / "Task04_Hippocampus")}
    cases = [by_id[i] for i in ids]
    rows: dict[tuple[str, str], dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        for cond, parts in CONDITIONS:
            for c in cases:
                img = nib.load(c.images[0])
                x = np.asanyarray(img.dataobj).astype(np.float32)
                y = shift_image(x, seed=1000 + int(c.id.split("_")[-1]), parts=parts) if parts else x
                nib.save(nib.Nifti1Image(y, img.affine), str(t / f"{cond}_{c.id}.nii.gz"))
        for name, model in zip(names, models):
            predictor = Predictor(model, device="cpu")
            for cond, _ in CONDITIONS:
                pairs = []
                for c in cases:
                    out = t / f"pred_{name}_{cond}_{c.id}.nii.gz"
                    predictor.predict_to_file(str(t / f"{cond}_{c.id}.nii.gz"), out)
                    pairs.append((c.id, str(out), c.label))
                s = summarize(evaluate_files(pairs, LABELS))
                rows[(name, cond)] = {k: s[v]["dice"]["mean"] for k, v in (("ant", LABELS[1]), ("post", LABELS[2]))}
    print(f"# {len(cases)} validation cases, mean Dice (anterior / posterior / mean) under each simulated shift alone")
    print("| condition | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for cond, _ in CONDITIONS:
        cells = []
        for name in names:
            r = rows[(name, cond)]
            cells.append(f"{r['ant']:.3f} / {r['post']:.3f} / **{(r['ant'] + r['post']) / 2:.3f}**")
        print(f"| {cond} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
