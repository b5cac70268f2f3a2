#!/usr/bin/env python
"""Brain-tumour models on cases they never saw: the BraTS 2013/2015 sample as an external test set.

Usage:  .venv/bin/python Testing/Benchmarks/bench_brats_external.py --model PACKAGE_OR_RUN [--model ...]

Why these cases stay out of training: the 6 cases of ``BraTS2015_DeepMedicSample`` have FLAIR and T1c only (the
four-sequence model cannot use them), come from an older BraTS release with its own label set (2015: 1 necrosis,
2 edema, 3 non-enhancing, 4 enhancing) at 1 mm, and are the only tumour cases outside BraTS 2018: kept out, they
are the one test of the FLAIR + T1c model on data it never saw. Before scoring, each is compared with every
BraTS 2018 case (block-averaged to 2 mm, correlation of the FLAIR images): a case that matches one (r >= 0.99, the
same patient and scan) is left out, and the script says which. Labels are mapped to the 2018 convention for
scoring (2015 labels 1 and 3 -> 1, 2 -> 2, 4 -> 4; the documented mapping of issue 13), and the BraTS regions are
scored: whole tumour (1+2+4), tumour core (1+4), enhancing tumour (4), at 1 mm on each case's own grid.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from DSDSegmentationLib.engine.cards import read_model_card
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize

MAP_2015_TO_2018 = {0: 0, 1: 1, 2: 2, 3: 1, 4: 4}
REGIONS = {"whole tumour": [1, 2, 4], "tumour core": [1, 4], "enhancing tumour": [4]}
LABELS_2018 = {0: "background", 1: "necrotic / non-enhancing core", 2: "edema", 4: "enhancing tumour"}


def to_2mm(x: np.ndarray) -> np.ndarray:
    s = [n // 2 * 2 for n in x.shape]
    return x[:s[0], :s[1], :s[2]].reshape(s[0] // 2, 2, s[1] // 2, 2, s[2] // 2, 2).mean((1, 3, 5))


def same_patient(case, brats2018: Path) -> tuple[str, float]:
    """The BraTS 2018 case whose FLAIR correlates best with this case's (2 mm), and the correlation."""
    a = to_2mm(np.asanyarray(nib.load(case.images[0]).dataobj).astype(np.float32))
    best = ("", -1.0)
    for c in list_cases(brats2018, channels=["FLAIR", "T1", "T1c", "T2"]):
        b = np.asanyarray(nib.load(c.images[0]).dataobj).astype(np.float32)
        m = [min(p, q) for p, q in zip(a.shape, b.shape)]
        r = float(np.corrcoef(a[:m[0], :m[1], :m[2]].ravel(), b[:m[0], :m[1], :m[2]].ravel())[0, 1])
        if r > best[1]:
            best = (c.id, r)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", required=True)
    args = ap.parse_args()
    data = find_shared_data()
    cases = list_cases(data / "BraTS2015_DeepMedicSample", channels=["FLAIR", "T1c"])
    keep = []
    for c in cases:
        match, r = same_patient(c, data / "BraTS2018_2mm")
        left_out = r >= 0.99
        print(f"{c.id}: closest BraTS 2018 case {match} (r = {r:.3f}){' -> left out: same scan' if left_out else ''}")
        if not left_out:
            keep.append(c)
    with tempfile.TemporaryDirectory() as tmp:
        refs = {}
        for c in keep:
            lab = nib.load(c.label)
            y = np.rint(np.asanyarray(lab.dataobj)).astype(np.int16)
            mapped = np.vectorize(MAP_2015_TO_2018.get)(y).astype(np.uint8)
            refs[c.id] = Path(tmp) / f"{c.id}_ref.nii.gz"
            nib.save(nib.Nifti1Image(mapped, lab.affine), str(refs[c.id]))
        print(f"\n# {len(keep)} external cases (never trained on), regions at 1 mm; Dice / HD95 mm")
        print("| model | trained on | " + " | ".join(REGIONS) + " |")
        print("|---|---|" + "---|" * len(REGIONS))
        for model in args.model:
            card = read_model_card(model)
            channels = card["preset"]["channels"]
            if [ch.lower() for ch in channels] != ["flair", "t1c"]:
                print(f"| {model} | – | needs {channels}; the external cases have FLAIR and T1c only |")
                continue
            predictor = Predictor(model, device="cpu")
            pairs = []
            for c in keep:
                out = Path(tmp) / f"{c.id}_{abs(hash(model))}.nii.gz"
                predictor.predict_to_file(c.images, out)
                pairs.append((c.id, str(out), str(refs[c.id])))
            values = {int(k) for k in card["preset"]["labels"]}
            if values != set(LABELS_2018):
                print(f"| {model} | – | labels {sorted(values)} are not the BraTS 2018 set; not comparable |")
                continue
            s = summarize(evaluate_files(pairs, LABELS_2018, regions=REGIONS))
            td = card.get("training_data", {})
            cells = [f"{s[r]['dice']['mean']:.3f} / " + (f"{s[r]['hd95']['mean']:.1f}" if s[r]['hd95']['mean'] is not None
                                                           else "undefined") for r in REGIONS]
            print(f"| {model} | {td.get('name', '?')} ({td.get('train_cases', '?')} cases) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
