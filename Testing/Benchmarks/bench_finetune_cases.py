#!/usr/bin/env python
"""How many cases must a researcher annotate? Fine-tune the shipped hippocampus model on N of their cases.

Usage:  .venv/bin/python Testing/Benchmarks/bench_finetune_cases.py [--scenarios labels shift] [--sizes 2 3 5 10]
            [--arms ft-dsd ft-plain scratch] [--seeds 0 1 2] [--epochs 30] [--out ~/dsdseg-runs/finetune-cases]
        ... --report          # tables and the plot from the finished runs only

Scenarios (cases: the shipped model's 42 validation cases, never trained on; the fine-tune cases are drawn per seed
from the first 22, the last 20 always evaluate):
  labels  a label-set change: whole hippocampus (anterior ∪ posterior) from the anterior/posterior model; the
          mapping is derived from the dataset's label name (a merge);
  shift   the simulated scanner/sequence shift of bench_finetune_domain_shift.py (inverted gamma contrast, bias
          field, thick slices, noise), same labels.
Arms, same cases, epochs and seed: ft-dsd (fine-tune with DSD), ft-plain (fine-tune without), scratch (the same
network trained from random weights, with DSD). N is the number of annotated cases the researcher gives; the
fine-tune holds one of them out for validation, so N = 1 is refused by the tool and not run.
Every run is one folder with result.json: rerunning the command skips finished runs (resumable). Prints Dice on the
20 evaluation cases per scenario, N and arm (mean ± sd over seeds), the paired per-case gain of fine-tuning over
scratch, and writes finetune_cases.png (the curve in the README).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_finetune_domain_shift import shift_image  # noqa: E402
from paired_stats import paired_difference  # noqa: E402

from DSDSegmentationLib.bridge.demo import default_model  # noqa: E402
from DSDSegmentationLib.engine.cards import read_model_card  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data, list_cases  # noqa: E402
from DSDSegmentationLib.engine.inference import Predictor  # noqa: E402
from DSDSegmentationLib.engine.metrics import evaluate_files  # noqa: E402

WHOLE = {0: "background", 1: "hippocampus"}


def write_cases(cases, folder: Path, scenario: str) -> Path:
    """The researcher's dataset for a scenario: whole-hippocampus labels, or shifted images with the same labels."""
    if (folder / "dataset.json").is_file():
        return folder
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir()
    entries = []
    for c in cases:
        img, lab = nib.load(c.images[0]), nib.load(c.label)
        x = np.asanyarray(img.dataobj).astype(np.float32)
        y = np.rint(np.asanyarray(lab.dataobj)).astype(np.uint8)
        if scenario == "shift":
            x = shift_image(x, seed=1000 + int(c.id.split("_")[-1]))
        else:
            y = (y > 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(x, img.affine), str(tmp / "imagesTr" / f"{c.id}.nii.gz"))
        nib.save(nib.Nifti1Image(y, lab.affine), str(tmp / "labelsTr" / f"{c.id}.nii.gz"))
        entries.append({"image": f"./imagesTr/{c.id}.nii.gz", "label": f"./labelsTr/{c.id}.nii.gz"})
    labels = WHOLE if scenario == "labels" else {0: "background", 1: "anterior hippocampus", 2: "posterior hippocampus"}
    (tmp / "dataset.json").write_text(json.dumps({"name": f"hippocampus {scenario}", "modality": {"0": "T1 MRI"},
                                                  "labels": {str(k): v for k, v in labels.items()},
                                                  "training": entries}, indent=1))
    tmp.rename(folder)
    return folder


def per_case_dice(model, folder: Path, pred_dir: Path) -> dict[str, float]:
    """Mean foreground Dice per evaluation case."""
    predictor = Predictor(model, device="cpu")
    labels = {int(k): v for k, v in predictor.model.preset.labels.items()}
    pred_dir.mkdir(parents=True, exist_ok=True)
    pairs = []
    for c in list_cases(folder):
        out = pred_dir / f"{c.id}.nii.gz"
        predictor.predict_to_file(c.images, out)
        pairs.append((c.id, str(out), c.label))
    rows = evaluate_files(pairs, labels)
    return {r["case"]: float(np.mean([m["dice"] for m in r["classes"].values()])) for r in rows}


def run_one(base: Path, arm: str, data: Path, run: Path, epochs: int, seed: int, eval_dir: Path) -> dict:
    from DSDSegmentationLib.engine.finetune import finetune
    from DSDSegmentationLib.engine.labelmapping import derive_mapping, mapped_preset
    from DSDSegmentationLib.engine.training import TrainConfig, Trainer

    if (run / "result.json").is_file():
        return json.loads((run / "result.json").read_text())
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    card = read_model_card(base)
    t0 = time.time()
    if arm.startswith("ft-"):
        result = finetune(base, data, run / "train", epochs=epochs, dsd=arm[3:], seed=seed, device="cpu",
                          store=run / "store", val_every=5)
        model = result["package"]
    else:  # scratch: the same network and preset, random weights, DSD, same epochs
        labels = json.loads((data / "dataset.json").read_text())["labels"]
        mapping = derive_mapping({int(k): v for k, v in card["preset"]["labels"].items()},
                                 {int(k): v for k, v in labels.items()})
        preset = mapped_preset(card["preset"], mapping)
        network = {**card["network"], "out_channels": len(mapping)}
        cfg = TrainConfig(task=preset["name"], data=str(data), output=str(run / "train"), dsd="dsd", epochs=epochs,
                          lr=3e-3, val_every=5, seed=seed, device="cpu", preset=preset, network=network)
        Trainer(cfg).fit()
        model = run / "train"
    minutes = (time.time() - t0) / 60
    dice = per_case_dice(model, eval_dir, run / "pred")
    out = {"arm": arm, "epochs": epochs, "seed": seed, "minutes": minutes, "dice": dice,
           "base": {"id": card.get("id"), "version": card.get("version")},
           "mean": float(np.mean(list(dice.values())))}
    (run / "result.json").write_text(json.dumps(out, indent=1))
    return out


def report(out: Path, scenarios, sizes, arms, seeds) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(scenarios), figsize=(5.2 * len(scenarios), 3.8), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios):
        print(f"# {scenario}: mean Dice on 20 evaluation cases (mean ± sd over the seeds that finished)")
        print("| cases | " + " | ".join(arms) + " | ft-dsd − scratch (paired per case) | ft-dsd − ft-plain |")
        print("|---:|" + "---:|" * (len(arms) + 2))
        for arm in arms:
            xs, ys, es = [], [], []
            for n in sizes:
                vals = [json.loads(p.read_text())["mean"] for s in seeds
                        if (p := out / scenario / f"n{n}" / f"{arm}_seed{s}" / "result.json").is_file()]
                if vals:
                    xs.append(n), ys.append(np.mean(vals)), es.append(np.std(vals))
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=arm)
        for n in sizes:
            cells, res = [], {}
            for arm in arms:
                res[arm] = [json.loads(p.read_text()) for s in seeds
                            if (p := out / scenario / f"n{n}" / f"{arm}_seed{s}" / "result.json").is_file()]
                vals = [r["mean"] for r in res[arm]]
                cells.append(f"{np.mean(vals):.3f} ± {np.std(vals):.3f} ({len(vals)})" if vals else "–")

            print(f"| {n} | " + " | ".join(cells) + f" | {paired_difference(res['ft-dsd'], res['scratch'])} | {paired_difference(res['ft-dsd'], res['ft-plain'])} |")
        print()
        ax.set_title({"labels": "whole hippocampus (merged labels)", "shift": "scanner / sequence shift"}[scenario])
        ax.set_xlabel("annotated cases"), ax.set_ylabel("Dice, 20 unseen cases"), ax.set_ylim(0, 1)
        ax.set_xticks(sizes)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "finetune_cases.png", dpi=100)
    print(f"plot: {out / 'finetune_cases.png'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scenarios", nargs="+", default=["labels", "shift"], choices=["labels", "shift"])
    ap.add_argument("--sizes", nargs="+", type=int, default=[2, 3, 5, 10])
    ap.add_argument("--arms", nargs="+", default=["ft-dsd", "ft-plain", "scratch"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", default=str(Path.home() / "dsdseg-runs" / "finetune-cases"))
    ap.add_argument("--report", action="store_true", help="only print the tables and write the plot")
    ap.add_argument("--base", default=str(default_model()),
                    help="the base model package (pin one version for a whole curve; the shipped one by default)")
    args = ap.parse_args()
    if min(args.sizes) < 2:
        raise SystemExit("a fine-tune holds one annotated case out for validation: N must be at least 2")
    out = Path(args.out).expanduser()
    base = Path(args.base).expanduser()
    card = read_model_card(base)
    by_id = {c.id: c for c in list_cases(find_shared_data() / "Task04_Hippocampus")}
    val = [by_id[i] for i in card["split"]["val_ids"]]
    pool, evaluate = val[:22], val[22:42]
    if not args.report:
        for scenario in args.scenarios:
            eval_dir = write_cases(evaluate, out / scenario / "eval", scenario)
            for n in args.sizes:
                for seed in args.seeds:
                    rng = np.random.default_rng(seed)
                    chosen = [pool[i] for i in sorted(rng.choice(len(pool), size=n, replace=False))]
                    data = write_cases(chosen, out / scenario / f"n{n}" / f"cases_seed{seed}", scenario)
                    for arm in args.arms:
                        r = run_one(base, arm, data, out / scenario / f"n{n}" / f"{arm}_seed{seed}", args.epochs, seed, eval_dir)
                        print(f"{scenario} n={n} {arm} seed {seed}: Dice {r['mean']:.4f} ({r['minutes']:.1f} min)",
                              flush=True)
    report(out, args.scenarios, args.sizes, args.arms, args.seeds)


if __name__ == "__main__":
    main()
