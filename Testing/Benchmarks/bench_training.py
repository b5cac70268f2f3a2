#!/usr/bin/env python
"""Full training of one task, DSD vs plain (same backbone, epochs, seed and split), on this machine.

Usage:  .venv/bin/python Testing/Benchmarks/bench_training.py --task hippocampus --epochs 40 [--seed 0] [--modes dsd plain]
        .venv/bin/python Testing/Benchmarks/bench_training.py --task cardiac --epochs 30
Runs go to output/bench_<task>/<mode>_seed<seed>. Resumable: rerun the same command after an interruption and each
run continues from its last checkpoint; --no-train evaluates the runs as they are.
Prints the validation Dice of every mode at each epoch all runs reached, then, per mode: minutes to reach the target
validation Dice, best validation Dice, per-class Dice / HD95 (mm) of the best checkpoint on the validation split (on
each case's original grid), and inference seconds per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from DSDSegmentationLib.worker.cli import main as cli
from DSDSegmentationLib.engine.data import Case, find_shared_data
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize
from DSDSegmentationLib.engine.tasks import load_preset

DATASETS = {"hippocampus": "Task04_Hippocampus", "cardiac": "ACDC_subset", "brain_tumour": "BraTS2018_2mm",
            "brain_tumour_2seq": "BraTS2018_2mm", "brain_tumour_2015": "BraTS2015_DeepMedicSample"}


def minutes_to(history: list[dict], target: float) -> float | None:
    elapsed = 0.0
    for h in history:
        elapsed += h["seconds"]
        if h.get("val_dice", -1) >= target:
            return elapsed / 60
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hippocampus", choices=sorted(DATASETS))
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--val-every", type=int, default=2)
    ap.add_argument("--modes", nargs="+", default=["dsd", "plain"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="default output/bench_<task>")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"],
                    help="passed to dsdseg train (default: a new run uses auto, a resumed run keeps its own)")
    ap.add_argument("--no-train", action="store_true",
                    help="evaluate the runs as they are (e.g. interrupted), without training further")
    args = ap.parse_args()
    data = find_shared_data() / DATASETS[args.task]
    out = Path(args.out or f"output/bench_{args.task}")
    rows = []
    for mode in args.modes:
        run = out / f"{mode}_seed{args.seed}"
        common = ["train", "--task", args.task, "--data", str(data), "--output", str(run), "--epochs", str(args.epochs),
                  "--dsd", mode, "--seed", str(args.seed), "--val-every", str(args.val_every), "--progress", "none",
                  *(["--precision", args.precision] if args.precision else [])]
        history_path = run / "history.json"
        done = history_path.is_file() and len(json.loads(history_path.read_text())) >= args.epochs
        if not done and not args.no_train:
            rc = cli(common + (["--resume"] if (run / "last.pt").is_file() else []))
            if rc != 0:
                raise SystemExit(f"training {mode} failed with exit code {rc}")
        history = json.loads(history_path.read_text())
        split = json.loads((run / "split.json").read_text())
        val = [Case(**c) for c in split["val"]]
        pred_dir = run / "val_predictions"
        predictor = Predictor(run, device="cpu")
        secs = []
        for c in val:
            t0 = time.perf_counter()
            predictor.predict_to_file(c.images, pred_dir / f"{c.id}.nii.gz")
            secs.append(time.perf_counter() - t0)
        metrics = summarize(evaluate_files([(c.id, str(pred_dir / f"{c.id}.nii.gz"), c.label) for c in val],
                                           predictor.model.preset.labels))
        rows.append({"mode": mode, "epochs": len(history), "train_minutes": sum(h["seconds"] for h in history) / 60,
                     "minutes_to_target": minutes_to(history, args.target),
                     "best_val_dice": max(h.get("val_dice", 0) for h in history), "metrics": metrics,
                     "infer_s": statistics.median(secs), "n_val": len(val)})
        (out / f"results_{'_'.join(args.modes)}_seed{args.seed}.json").write_text(json.dumps(rows, indent=2))
    common_epochs = min(r["epochs"] for r in rows)
    histories = {r["mode"]: json.loads((out / f"{r['mode']}_seed{args.seed}" / "history.json").read_text()) for r in rows}
    print(f"# validation Dice (mean of both classes, preprocessed space) at the epochs every run reached (<= {common_epochs})")
    print("| epoch | " + " | ".join(histories) + " |")
    print("|---:|" + "---:|" * len(histories))
    for e in range(1, common_epochs + 1):
        vals = [next((h.get("val_dice") for h in hist if h["epoch"] == e), None) for hist in histories.values()]
        if all(v is not None for v in vals):
            print(f"| {e} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    print()
    classes = [name for value, name in sorted(load_preset(args.task).labels.items()) if value]
    print(f"# {args.task}, {rows[0]['n_val']} validation cases, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; Dice / HD95 of the best checkpoint on the original grids")
    print(f"| mode | epochs | train min | min to Dice ≥ {args.target} | best val Dice | "
          + " | ".join(f"{c} Dice" for c in classes) + " | " + " | ".join(f"{c} HD95 (mm)" for c in classes)
          + " | s / case (CPU) |")
    print("|---|" + "---:|" * (5 + 2 * len(classes)))
    for r in rows:
        m = r["metrics"]
        reach = f"{r['minutes_to_target']:.1f}" if r["minutes_to_target"] is not None else "not reached"
        print(f"| {r['mode']} | {r['epochs']} | {r['train_minutes']:.1f} | {reach} | {r['best_val_dice']:.4f} | "
              + " | ".join(f"{m[c]['dice']['mean']:.4f}" for c in classes) + " | "
              + " | ".join(f"{m[c]['hd95']['mean']:.2f}" for c in classes) + f" | {r['infer_s']:.3f} |")


if __name__ == "__main__":
    main()
