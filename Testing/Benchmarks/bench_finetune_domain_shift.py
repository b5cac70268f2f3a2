#!/usr/bin/env python
"""Domain shift on hippocampus: does fine-tuning on 5 cases of a new "scanner" recover the shipped model?

Usage:  .venv/bin/python Testing/Benchmarks/bench_finetune_domain_shift.py [--epochs 60] [--out output/bench_finetune]

Target domain (deterministic per case, images only; labels unchanged on the same grid), a simulated change of
scanner and sequence:
  1. contrast change: intensities rescaled to [0, 1], inverted and gamma-corrected, x' = (1 - x)^1.5 (a T2-like look);
  2. multiplicative bias field: exp of a random second-order polynomial of the normalised coordinates, amplitude
     about ±30 %;
  3. anisotropic resampling: thick slices along the last axis (average of 3 neighbouring slices, every third slice
     kept) linearly interpolated back onto the original grid;
  4. Gaussian noise at 2 % of the intensity range.
Cases: the 42 validation cases of the shipped hippocampus model (never used to train it): the first 5 fine-tune
(one of them is held out by the fine-tune for validation), the next 20 evaluate. Prints Dice per class of the
base model on the original and the shifted evaluation cases, and of the fine-tuned model on the shifted ones, with
the fine-tune's wall time. Targets: >= +5 Dice points, <= 10 minutes on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from DSDSegmentationLib.bridge.demo import default_model
from DSDSegmentationLib.engine.cards import read_model_card
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.finetune import finetune
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize


SHIFTS = ("contrast", "bias", "thick", "noise")


def shift_image(x: np.ndarray, seed: int, parts: tuple[str, ...] = SHIFTS) -> np.ndarray:
    """The simulated scanner/sequence shift, all four parts by default (the target domain of this benchmark), or
    only some of them (``bench_single_shifts.py``); the random draws are the same whichever parts run."""
    rng = np.random.default_rng(seed)
    lo, hi = np.percentile(x, [0.5, 99.5])
    v = np.clip((x - lo) / max(hi - lo, 1e-6), 0, 1)
    if "contrast" in parts:
        v = (1 - v) ** 1.5
    for part, gamma in (("gamma", 1.5), ("gamma_low", 1 / 1.5)):  # gamma alone (single-shift benchmark only)
        if part in parts:
            v = v ** gamma
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in v.shape], indexing="ij")
    terms = [np.ones_like(grids[0]), *grids] + [g * h for i, g in enumerate(grids) for h in grids[i:]]
    log_field = sum(rng.uniform(-0.3, 0.3) * t for t in terms[1:])
    if "bias" in parts:
        v = v * np.exp(log_field)
    if "thick" in parts:
        k = v.shape[2]
        thick = np.stack([v[:, :, max(i - 1, 0):i + 2].mean(axis=2) for i in range(0, k, 3)], axis=2)
        t = np.arange(k) / 3.0  # linear interpolation of the thick slices back onto the original slice positions
        i0 = np.minimum(np.floor(t).astype(int), thick.shape[2] - 1)
        i1 = np.minimum(i0 + 1, thick.shape[2] - 1)
        w = t - i0
        v = thick[:, :, i0] * (1 - w) + thick[:, :, i1] * w
    noise = rng.normal(0, 0.02, v.shape)
    if "noise" in parts:
        v = v + noise
    return (v * 1000).astype(np.float32)


def write_dataset(cases, folder: Path, shifted: bool) -> Path:
    (folder / "imagesTr").mkdir(parents=True, exist_ok=True)
    (folder / "labelsTr").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, c in enumerate(cases):
        img = nib.load(c.images[0])
        data = np.asanyarray(img.dataobj).astype(np.float32)
        out = shift_image(data, seed=1000 + int(c.id.split("_")[-1])) if shifted else data
        nib.save(nib.Nifti1Image(out, img.affine), folder / "imagesTr" / f"{c.id}.nii.gz")
        shutil.copy(c.label, folder / "labelsTr" / f"{c.id}.nii.gz")
        entries.append({"image": f"./imagesTr/{c.id}.nii.gz", "label": f"./labelsTr/{c.id}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"name": "shifted hippocampus", "labels": {"0": "background",
                                         "1": "Anterior", "2": "Posterior"}, "modality": {"0": "MRI"},
                                         "numTraining": len(entries), "training": entries}, indent=1))
    return folder


def dice_table(model, folder: Path, labels: dict[int, str], pred_dir: Path) -> dict:
    predictor = Predictor(model, device="cpu")
    pairs = []
    for c in list_cases(folder):
        out = pred_dir / f"{c.id}.nii.gz"
        predictor.predict_to_file(c.images, out)
        pairs.append((c.id, str(out), c.label))
    s = summarize(evaluate_files(pairs, labels))
    return {name: v["dice"]["mean"] for name, v in s.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--out", default="output/bench_finetune")
    ap.add_argument("--dsd", default="dsd")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        shutil.rmtree(out)
    base = default_model()
    card = read_model_card(base)
    labels = {int(k): v for k, v in card["preset"]["labels"].items()}
    by_id = {c.id: c for c in list_cases(find_shared_data() / "Task04_Hippocampus")}
    val = [by_id[i] for i in card["split"]["val_ids"]]
    tune, evaluate = val[:5], val[5:25]
    tune_dir = write_dataset(tune, out / "target_finetune", shifted=True)
    eval_dir = write_dataset(evaluate, out / "target_eval", shifted=True)
    orig_dir = write_dataset(evaluate, out / "source_eval", shifted=False)
    for d in ("p_orig", "p_before", "p_after"):
        (out / d).mkdir()
    source = dice_table(base, orig_dir, labels, out / "p_orig")
    before = dice_table(base, eval_dir, labels, out / "p_before")
    t0 = time.time()
    result = finetune(base, tune_dir, out / "run", epochs=args.epochs, lr=args.lr, dsd=args.dsd, device="cpu",
                      store=out / "store", val_every=5)
    minutes = (time.time() - t0) / 60
    after = dice_table(result["package"], eval_dir, labels, out / "p_after")
    rows = {"source (original images), base model": source, "target (shifted), base model": before,
            "target (shifted), fine-tuned on 5 target cases": after}
    (out / "results.json").write_text(json.dumps({"rows": rows, "finetune_minutes": minutes, "epochs": args.epochs,
                                                 "lr": args.lr, "dsd": args.dsd, "model": result["model_id"]}, indent=2))
    names = [labels[v] for v in sorted(labels) if v]
    print(f"# 20 evaluation cases; fine-tune {args.epochs} epochs, lr {args.lr}, {args.dsd}, {minutes:.1f} min wall time (incl. "
          "evaluation of base and result on the held-out fine-tune case)")
    print("| images, model | " + " | ".join(f"{n} Dice" for n in names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for k, v in rows.items():
        print(f"| {k} | " + " | ".join(f"{v[n]:.4f}" for n in names) + f" | {np.mean([v[n] for n in names]):.4f} |")
    gain = 100 * (np.mean([after[n] for n in names]) - np.mean([before[n] for n in names]))
    print(f"gain: {gain:+.1f} Dice points (target >= +5); time {minutes:.1f} min (target <= 10)")


if __name__ == "__main__":
    main()
