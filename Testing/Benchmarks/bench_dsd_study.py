#!/usr/bin/env python
"""Where does DSD help? plain vs deep supervision only (ds) vs full DSD, several seeds, full and low-data regimes.

Usage:  .venv/bin/python Testing/Benchmarks/bench_dsd_study.py [--task hippocampus] [--backbones basicunet dynunet]
            [--arms plain ds dsd [dsd-detached]] [--seeds 0 1 2] [--fractions 0.1 0.25 1.0] [--steps 2000]
            [--precision auto|fp32|bf16] [--out ~/dsdseg-runs/dsd-study]
            (runs in <out>/<task>/<backbone>/steps<N>[-bf16]/frac<f>/<arm>_seed<s>)
        ... --report        # the tables from finished runs only
The transformer arm on a lent GPU (one device call; SwinUNETR needs patch sizes in multiples of 32; prepare here with
``Testing/Device/pack.py --dataset Task04_Hippocampus``, carry [".device"], timeout_s 600):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl &&
    PYTHONPATH=/tmp/site:$PWD/DSDSegmentation DSDSEG_DATA=$PWD/.device/data timeout 520 python3 \
        Testing/Benchmarks/bench_dsd_study.py --task hippocampus --backbones swinunetr --patch 32 64 32 --fractions 0.1 \
        --seeds 0 1 --steps 1000 --precision bf16 --device cuda --workers 12 --out /tmp/study;
    cp -r Testing/Benchmarks/results/dsd-study/hippocampus/swinunetr-p32x64x32 $OUT/
(every finished run's result is archived as it ends, so a run cut by the timeout loses only itself; back here, copy
the folder into Testing/Benchmarks/results/dsd-study/hippocampus/ and run --report with the same flags but --device).

Design (every arm gets the same): one validation split by patient (split seed 0) for all runs, so comparisons are
paired per validation case; per (fraction, seed) the same seeded share of the training patients; the same number of
optimiser steps per run whatever the fraction (epochs = steps / steps per epoch), the preset's schedule, batch and
augmentation; seed s fixes the weights' initialisation, data order and augmentation for every arm. Each run is a
folder with result.json (best checkpoint's Dice per validation case on its original grid): rerunning skips
finished runs. The fine-tuning regime (DSD vs plain fine-tuning on 5 shifted cases, 3 seeds) is
bench_finetune_cases.py --scenarios shift --sizes 5.

Report per task, backbone and fraction: mean Dice of each arm (mean ± 95 % CI over seeds), and the paired
differences dsd − plain and ds − plain over (seed, case) pairs with a Wilcoxon signed-rank test — every arm, also
where DSD loses.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from paired_stats import paired_difference

from DSDSegmentationLib.engine.data import Case, find_shared_data
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files
from DSDSegmentationLib.engine.tasks import load_preset
from DSDSegmentationLib.engine.config import DSDConfig
from DSDSegmentationLib.engine.networks import DSDNet
from DSDSegmentationLib.engine.training import TrainConfig, Trainer, bf16_problem, resolve_precision

# every finished run's result.json is also kept here, in the repository (a few kB each): the run folders live outside the
# work tree (~/dsdseg-runs) on a machine that is not always kept between sessions, and the tables must not depend on it
ARCHIVE = Path(__file__).resolve().parent / "results" / "dsd-study"
DATASETS = {"hippocampus": "Task04_Hippocampus", "cardiac": "ACDC_subset", "brain_tumour": "BraTS2018_2mm"}
BACKBONE_OPTIONS = {"basicunet": {}, "dynunet": {"filters": [8, 16, 32, 64, 128]}}
# ablation arms beyond the DSD presets (plain, ds, decoder, encoder, dsd): name -> (preset, DSD overrides).
# dsd-detached: full DSD with the teachers' gradients stopped (the paper's code lets the KL pull the teacher too)
ABLATIONS = {"dsd-detached": ("dsd", {"detach_teacher": True})}


def run_one(task: str, backbone: str, arm: str, seed: int, fraction: float, steps: int, out: Path,
            precision: str = "fp32", device: str = "cpu", patch: list[int] | None = None, workers: int = 0) -> dict:
    if (out / "result.json").is_file():
        keep(out)
        return json.loads((out / "result.json").read_text())
    if archived(out).is_file():
        return json.loads(archived(out).read_text())
    preset = load_preset(task)
    data = find_shared_data() / DATASETS[task]
    # steps per epoch at this fraction: training patients / batch size (each volume gives samples_per_volume
    # patches to its batch), known after the split
    train_dir = out / "train"
    terms, overrides = ABLATIONS.get(arm, (arm, {}))
    cfg = TrainConfig(task=task, data=str(data), output=str(train_dir), dsd=terms, dsd_overrides=dict(overrides),
                      backbone=backbone,
                      backbone_options=BACKBONE_OPTIONS.get(backbone, {}) if backbone != preset.network["backbone"] else None,
                      seed=seed, split_seed=0, train_fraction=fraction if fraction < 1 else None, device=device,
                      epochs=1, val_every=1, precision=precision, num_workers=workers,
                      preset={**preset.to_dict(), "patch_size": list(patch)} if patch else None)
    resume = (train_dir / "last.pt").is_file()
    if not resume:
        shutil.rmtree(train_dir, ignore_errors=True)
        dry = Trainer(cfg)
        train_cases, _ = dry._prepare_run_folder()
        per_epoch = max(1, math.ceil(len(train_cases) / preset.training["batch_size"]))
        shutil.rmtree(train_dir)
        cfg.epochs = max(1, round(steps / per_epoch))
        cfg.val_every = max(1, cfg.epochs // 10)
    else:
        saved = json.loads((train_dir / "config.json").read_text())
        cfg.epochs, cfg.val_every = saved["epochs"], saved["val_every"]
    Trainer(cfg, resume=resume).fit()
    split = json.loads((train_dir / "split.json").read_text())
    val = [Case(**c) for c in split["val"]]
    predictor = Predictor(train_dir, device=device)
    labels = {int(k): v for k, v in preset.labels.items()}
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for c in val:
            p = Path(tmp) / f"{c.id}.nii.gz"
            predictor.predict_to_file(c.images, p)
            pairs.append((c.id, str(p), c.label))
        rows = evaluate_files(pairs, labels)
    dice = {r["case"]: float(np.mean([m["dice"] for m in r["classes"].values()])) for r in rows}
    result = {"task": task, "backbone": backbone, "arm": arm, "seed": seed, "fraction": fraction, "steps": steps,
              "epochs": cfg.epochs, "precision": precision, "device": device,
              **({"patch_size": list(patch)} if patch else {}),
              "train_cases": len(split["train"]), "dice": dice, "mean": float(np.mean(list(dice.values())))}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    keep(out)
    return result


def archived(out: Path) -> Path:
    """Where the repository keeps the result of the run in ``out`` (same task/backbone/budget/share/arm_seed)."""
    return ARCHIVE.joinpath(*out.parts[-5:-1], out.parts[-1] + ".json")


def keep(out: Path) -> None:
    target = archived(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.is_file():
        shutil.copyfile(out / "result.json", target)


def load_result(out: Path) -> dict | None:
    """A finished run's result: its folder's result.json, else the repository's copy."""
    for p in (out / "result.json", archived(out)):
        if p.is_file():
            return json.loads(p.read_text())
    return None


def run_dir(root: Path, task: str, backbone: str, steps: int, fraction: float, arm: str, seed: int,
            precision: str = "fp32") -> Path:
    """One run's folder: the step budget and the arithmetic (fp32, or bf16 autocast) are part of it, so neither
    ever mixes in a table (a patch other than the preset's is part of ``backbone``'s folder name: see main)."""
    budget = f"steps{steps}" + ("" if precision == "fp32" else f"-{precision}")
    return root / task / backbone / budget / f"frac{fraction:g}" / f"{arm}_seed{seed}"


def report(root: Path, task: str, backbones, arms, seeds, fractions, steps: int, precision: str = "fp32") -> None:
    from scipy.stats import t as student

    for backbone in backbones:
        print(f"# {task}, {backbone}, {steps} optimiser steps per run, {precision}: mean validation Dice (mean ± 95 % CI "
              "over seeds, n seeds)")
        against = [a for a in ("dsd", "ds") if a in arms] + [a for a in arms if a not in ("plain", "dsd", "ds")]
        print("| training share | " + " | ".join(arms) + " | " + " | ".join(f"{a} − plain (paired)" for a in against) + " |")
        print("|---:|" + "---:|" * (len(arms) + len(against)))
        for f in fractions:
            res = {a: [r for s in seeds
                       if (r := load_result(run_dir(root, task, backbone, steps, f, a, s, precision))) is not None]
                   for a in arms}
            cells = []
            for a in arms:
                v = [r["mean"] for r in res[a]]
                ci = student.ppf(0.975, len(v) - 1) * np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else float("nan")
                cells.append(f"{np.mean(v):.4f} ± {ci:.4f} ({len(v)})" if v else "–")

            diffs = [paired_difference(res.get(a, []), res.get("plain", []), 2) for a in against]
            print(f"| {f:g} | " + " | ".join(cells + diffs) + " |")
        print()
        if precision != "fp32":
            precision_check(root, task, backbone, arms, seeds, fractions, steps, precision)


def precision_check(root: Path, task: str, backbone: str, arms, seeds, fractions, steps: int, precision: str) -> None:
    """Runs that exist in fp32 and in ``precision`` with the same arm, seed and share: Dice of each and the paired
    per-case difference (same validation cases), so the faster arithmetic is checked against fp32."""
    rows = []
    for f in fractions:
        for a in arms:
            for s in seeds:
                ra, rb = (load_result(run_dir(root, task, backbone, steps, f, a, s, p)) for p in (precision, "fp32"))
                if ra is not None and rb is not None:
                    rows.append(f"| {f:g} | {a} | {s} | {rb['mean']:.4f} | {ra['mean']:.4f} | "
                                f"{paired_difference([ra], [rb], 2)} |")
    if rows:
        print(f"# {precision} vs fp32, same arm, seed, training share and validation cases")
        print(f"| training share | arm | seed | fp32 | {precision} | {precision} − fp32 (paired) |")
        print("|---:|---|---:|---:|---:|---:|")
        print("\n".join(rows))
        print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="hippocampus", choices=sorted(DATASETS))
    ap.add_argument("--backbones", nargs="+", default=["basicunet", "dynunet"])
    ap.add_argument("--arms", nargs="+", default=["plain", "ds", "dsd"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 1.0])
    ap.add_argument("--steps", type=int, default=2000, help="optimiser steps per run, every arm and fraction")
    ap.add_argument("--out", default=str(Path.home() / "dsdseg-runs" / "dsd-study"))
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                    help="training arithmetic of every run (auto: bf16 on a CPU with native bf16, else fp32)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every run trains and is "
                    "evaluated (cuda: the GPU session's transformer arm; the folders do not say it, the results do)")
    ap.add_argument("--patch", type=int, nargs=3, help="training patch instead of the preset's, e.g. 32 64 32 for "
                    "SwinUNETR (its sizes must be multiples of 32); part of the backbone's folder name")
    ap.add_argument("--workers", type=int, default=0, help="data-loader processes per run (GPU: 8-12)")
    ap.add_argument("--report", action="store_true")
    args = ap.parse_args()
    root = Path(args.out).expanduser()
    precision = resolve_precision(args.precision, torch.device(args.device))
    folder = {b: b + (f"-p{'x'.join(map(str, args.patch))}" if args.patch else "") for b in args.backbones}
    if precision == "bf16" and args.device == "cpu" and not args.report:  # the check training runs, before the folders are named bf16
        preset = load_preset(args.task)
        for backbone in args.backbones:
            net = preset.network_config(backbone=backbone, options=BACKBONE_OPTIONS.get(backbone, {})) \
                if backbone != preset.network["backbone"] else preset.network_config()
            problem = bf16_problem(DSDNet(net, DSDConfig.preset("dsd")), (1, len(preset.channels), *preset.patch_size))
            if problem and args.precision == "bf16":
                raise SystemExit(f"--precision bf16: {problem}; use --precision fp32")
            if problem:
                print(f"{problem}: every run in fp32", flush=True)
                precision = "fp32"
                break
    if not args.report:
        # low-data regimes first (where self-distillation is expected to matter most), light backbone first
        for backbone in args.backbones:
            for f in sorted(args.fractions):
                for seed in args.seeds:
                    for arm in args.arms:
                        r = run_one(args.task, backbone, arm, seed, f, args.steps,
                                    run_dir(root, args.task, folder[backbone], args.steps, f, arm, seed, precision),
                                    precision, args.device, args.patch, args.workers)
                        print(f"{args.task} {backbone} share {f:g} seed {seed} {arm}: Dice {r['mean']:.4f} "
                              f"({r['train_cases']} training cases, {r['epochs']} epochs)", flush=True)
    report(root, args.task, [folder[b] for b in args.backbones], args.arms, args.seeds, args.fractions, args.steps,
           precision)


if __name__ == "__main__":
    main()
