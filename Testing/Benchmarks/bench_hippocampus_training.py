#!/usr/bin/env python
"""Full hippocampus training, DSD vs plain (same backbone, budget, seed and split), on this machine.

Usage:  .venv/bin/python Testing/Benchmarks/bench_hippocampus_training.py --epochs 60 [--out output/bench_hippo]
Resumable: rerun the same command after an interruption and each run continues from its last checkpoint.
Prints the validation Dice of every mode at each epoch all runs reached, then, per mode: minutes to reach validation Dice >= 0.85, best validation Dice, and per-class Dice / HD95 (mm)
of the best checkpoint on the validation split (on each case's original grid), and inference seconds per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from DSDSegmentationLib.cli import main as cli
from DSDSegmentationLib.engine.data import Case, find_shared_data
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize


def minutes_to(history: list[dict], target: float) -> float | None:
    elapsed = 0.0
    for h in history:
        elapsed += h["seconds"]
        if h.get("val_dice", -1) >= target:
            return elapsed / 60
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=60)
    ap.add_argument("--modes", nargs="+", default=["dsd", "plain"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="output/bench_hippo")
    ap.add_argument("--target", type=float, default=0.85)
    ap.add_argument("--no-train", action="store_true",
                    help="evaluate the runs as they are (e.g. interrupted), without training further")
    args = ap.parse_args()
    data = find_shared_data() / "Task04_Hippocampus"
    out = Path(args.out)
    rows = []
    for mode in args.modes:
        run = out / f"{mode}_seed{args.seed}"
        common = ["train", "--task", "hippocampus", "--data", str(data), "--output", str(run), "--epochs", str(args.epochs),
                  "--dsd", mode, "--seed", str(args.seed), "--val-every", "2", "--progress", "none"]
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
    print(f"# hippocampus, {rows[0]['n_val']} validation cases, seed {args.seed}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; Dice / HD95 of the best checkpoint on the original grids")
    print(f"| mode | epochs | train min | min to Dice ≥ {args.target} | best val Dice | anterior Dice | posterior Dice | "
          "anterior HD95 (mm) | posterior HD95 (mm) | s / case (CPU) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        m = r["metrics"]
        a, p = m["anterior hippocampus"], m["posterior hippocampus"]
        reach = f"{r['minutes_to_target']:.1f}" if r["minutes_to_target"] is not None else "not reached"
        print(f"| {r['mode']} | {r['epochs']} | {r['train_minutes']:.1f} | {reach} | {r['best_val_dice']:.4f} | "
              f"{a['dice']['mean']:.4f} | {p['dice']['mean']:.4f} | {a['hd95']['mean']:.2f} | {p['hd95']['mean']:.2f} | "
              f"{r['infer_s']:.3f} |")


if __name__ == "__main__":
    main()
