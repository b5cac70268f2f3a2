#!/usr/bin/env python
"""One prepared GPU session: the checks no CPU machine can do, then a time-boxed training of the packed task.

Prepare here:   .venv/bin/python Testing/Device/pack.py --dataset ACDC_subset      (or BraTS2018_2mm)
Run there (device ``run``, carry [".device"], timeout_s 600), as ONE command:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/wheels/*.whl &&
    PYTHONPATH=/tmp/site:$PWD/DSDSegmentation python3 Testing/Device/gpu_session.py --train-min 5.5 --out $OUT \
        [--arms dsd plain] [--init-from Resources/Models/cardiac-dsd --lr 0.001]
        [--filters 16 32 64 128 256 [--init-from .device/models/<name>]]   (a wider network, new or continued)
(about 0.5 min install, 1.5 min checks, 0.5 min calibration, 1 min caching, then the schedule: under 10 min)
Dry run here (CPU, a few steps):  .venv/bin/python Testing/Device/gpu_session.py --dry-run --out /tmp/gpu-dry
Back here:  .venv/bin/python Testing/Device/unpack.py FILES_AT --to ~/dsdseg-runs/gpu-<task>   (run folders that
package_model.py --run takes, their data paths pointed at ../shared/data, so validation runs on the original files)

Writes to --out (at most 8 files of at most 16 MiB come back): session.json (card, torch, CUDA, timings, every check
with its numbers and pass/fail) and per arm <arm>_run.json (the run's config, split, history and log) and its best
checkpoint in parts of at most 15 MiB (<arm>_best.pt.00, .01, ...: the brain-tumour checkpoint is 23 MB). Checks:
  1. CUDA inference equals CPU: the shipped hippocampus model on its sample cases, labels agree on >= 99.9 % of
     voxels and the uncertainty maps within 1e-3 (float32 on both; a different kernel order only);
  2. AMP training step: DSD loss under autocast + GradScaler equals the float32 loss at the same weights within
     2 %, the step is finite and changes the weights;
  3. out-of-memory fallback: with the process limited to a sliver of GPU memory, the Predictor's real CUDA
     out-of-memory (moving the input, the windows; and loading a model) falls back to the CPU, says so in its
     notes, and gives the CPU result;
  4. timings, median of repetitions: inference per case (CUDA vs this machine's CPU) and a DSD training step.
Training: the packed task's preset (seed 0, or --seed) for each arm (``--arms``: DSD by default; ``dsd plain`` compares them at
the same budget), the same number of epochs for every arm, chosen from a 2-epoch DSD calibration so that all arms'
full schedules (poly learning rate to 0) end within --train-min minutes; validation every ~10 % of the epochs.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "DSDSegmentation"))

from DSDSegmentationLib.engine import DSDConfig, DSDLoss, DSDNet, NetworkConfig  # noqa: E402
from DSDSegmentationLib.engine.cards import builtin_models_dir  # noqa: E402
from DSDSegmentationLib.engine.data import list_cases  # noqa: E402
from DSDSegmentationLib.engine.inference import Predictor  # noqa: E402
from DSDSegmentationLib.engine.tasks import load_preset  # noqa: E402
from DSDSegmentationLib.engine.outputs import atomic_write_text  # noqa: E402
from DSDSegmentationLib.engine.training import TrainConfig, Trainer  # noqa: E402

RUN_JSON = ("config.json", "history.json", "split.json")
PART_BYTES = 15 * 2**20  # the device returns files of at most 16 MiB


def write_run(run_dir: Path, out: Path, arm: str) -> list[str]:
    """One run as <arm>_run.json (config, history, split, log) and <arm>_best.pt.NN parts; returns the names.
    Each file is replaced atomically, so a snapshot taken while training (see Snapshots) is never half written."""
    record = {name: json.loads((run_dir / name).read_text()) for name in RUN_JSON if (run_dir / name).is_file()}
    record["log.txt"] = (run_dir / "log.txt").read_text() if (run_dir / "log.txt").is_file() else ""
    names = [f"{arm}_run.json"]
    data = (run_dir / "best.pt").read_bytes() if (run_dir / "best.pt").is_file() else b""
    for i in range(0, len(data), PART_BYTES):
        names.append(f"{arm}_best.pt.{i // PART_BYTES:02d}")
        atomic_write_text(out / names[-1], data[i:i + PART_BYTES])
    atomic_write_text(out / names[0], json.dumps(record))
    return names


class Snapshots(threading.Thread):
    """While an arm trains, copies its run (best checkpoint, history, log) to --out whenever best.pt changes, so a
    session stopped at the device's time limit still brings back the best weights so far."""

    def __init__(self, run_dir: Path, out: Path, arm: str, every_s: float = 20.0):
        super().__init__(daemon=True)
        self.run_dir, self.out, self.arm, self.every_s = run_dir, out, arm, every_s
        self.done = threading.Event()
        self.seen = None

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            best = self.run_dir / "best.pt"
            try:
                stamp = best.stat().st_mtime_ns if best.is_file() else None
                if stamp is not None and stamp != self.seen:
                    time.sleep(1.0)  # best.pt is saved atomically; history may follow a moment later
                    write_run(self.run_dir, self.out, self.arm)
                    self.seen = stamp
            except Exception:  # noqa: BLE001 (a snapshot must never stop the training)
                traceback.print_exc()


def sample_cases() -> list[str]:
    return [c.images[0] for c in list_cases(REPO / "Resources" / "SampleData" / "Hippocampus")]


def check_cuda_equals_cpu(dev: str) -> dict:
    model = builtin_models_dir() / "hippocampus-dsd"
    cpu, gpu = Predictor(model, device="cpu"), Predictor(model, device=dev)
    rows = []
    for path in sample_cases():
        la, _, ua = cpu.predict(path, uncertainty=True)
        lb, _, ub = gpu.predict(path, uncertainty=True)
        rows.append({"case": Path(path).name, "label_agreement": float((la == lb).mean()),
                     "uncertainty_max_diff": float(np.abs(ua - ub).max())})
    ok = all(r["label_agreement"] >= 0.999 and r["uncertainty_max_diff"] <= 1e-3 for r in rows)
    return {"pass": ok, "cases": rows}


def check_amp_step(dev: str) -> dict:
    torch.manual_seed(0)
    net = DSDNet(NetworkConfig("dynunet", 1, 3, (64, 64, 64), {"filters": (16, 32, 64, 128, 256)}), DSDConfig.preset("dsd"))
    net = net.to(dev).train()
    loss_fn = DSDLoss(net.dsd_config)
    x = torch.randn(2, 1, 64, 64, 64, device=dev)
    y = (x > 0.5).long() + (x > 1.2).long()  # a learnable 3-class target
    with torch.no_grad():
        fp32 = float(loss_fn(net(x), y))
        with torch.autocast("cuda", dtype=torch.float16):
            amp = float(loss_fn(net(x), y))
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        loss = loss_fn(net(x), y)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    changed = any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    finite = all(bool(torch.isfinite(p).all()) for p in net.parameters())
    rel = abs(amp - fp32) / max(abs(fp32), 1e-8)
    return {"pass": rel <= 0.02 and changed and finite and math.isfinite(float(loss)), "loss_fp32": fp32,
            "loss_amp": amp, "relative_difference": rel, "weights_changed": changed, "weights_finite": finite}


def check_oom_fallback(dev: str) -> dict:
    model = builtin_models_dir() / "hippocampus-dsd"
    path = sample_cases()[0]
    expected, _ = Predictor(model, device="cpu").predict(path)
    predictor = Predictor(model, device=dev)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(max(1e-6, (8 << 20) / total))  # ~8 MiB: the windows cannot fit
    try:
        labels, _ = predictor.predict(path)
        late = Predictor(model, device=dev)  # a model loaded while the GPU is full
        late_labels, _ = late.predict(path)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    notes, late_notes = list(predictor.notes), list(late.notes)
    predictor.notes = []  # the GPU has room again: the same (warm) predictor runs there again, with no fallback
    again, _ = predictor.predict(path)
    on_gpu = next(predictor.network.parameters()).device.type == "cuda"
    agree_again = float((again == expected).mean())
    agree, late_agree = float((labels == expected).mean()), float((late_labels == expected).mean())
    # the late model's weights may still fit in memory the allocator holds: then its windows run out instead
    ok = (any("out of memory" in n for n in notes) and agree >= 0.999
          and any("out of memory" in n for n in late_notes) and late_agree >= 0.999
          and not predictor.notes and on_gpu and agree_again >= 0.999)
    return {"pass": ok, "notes": notes, "agreement_with_cpu": agree, "notes_model_loaded_when_full": late_notes,
            "agreement_with_cpu_model_loaded_when_full": late_agree, "next_request_notes": list(predictor.notes),
            "next_request_on_gpu": on_gpu, "next_request_agreement_with_cpu": agree_again}


def timings(dev: str, reps: int = 5) -> dict:
    model = builtin_models_dir() / "hippocampus-dsd"
    path = sample_cases()[0]
    out = {}
    for name, device in (("cpu", "cpu"), ("cuda", dev)):
        p = Predictor(model, device=device)
        p.predict(path)
        ts = []
        for _ in range(reps):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            p.predict(path)
            if device != "cpu":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        out[f"hippocampus_case_{name}_s"] = statistics.median(ts)
    net = DSDNet(NetworkConfig("dynunet", 1, 3, (128, 128, 128), {"filters": (16, 32, 64, 128, 256)}),
                 DSDConfig.preset("dsd")).to(dev).train()
    loss_fn, opt = DSDLoss(net.dsd_config), torch.optim.AdamW(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler("cuda")
    x = torch.randn(2, 1, 128, 128, 128, device=dev)
    y = (x > 0.5).long()
    ts = []
    for i in range(reps + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            loss = loss_fn(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        torch.cuda.synchronize()
        if i >= 2:
            ts.append(time.perf_counter() - t0)
    out["dynunet_128cube_batch2_amp_step_s"] = statistics.median(ts)
    return out


def train(manifest: dict, out: Path, minutes: float, device: str, workers: int, dry: bool,
          arms: tuple[str, ...] = ("dsd",), init_from: str | None = None, lr: float | None = None,
          filters: list[int] | None = None, seed: int = 0) -> dict:
    data = REPO / ".device" / "data" / manifest["dataset"]
    task = manifest["task"]
    cal_dir = Path("/tmp/dsdseg-cal")
    shutil.rmtree(cal_dir, ignore_errors=True)
    common = dict(task=task, data=str(data), seed=seed, device=device, num_workers=workers)
    if filters:  # a wider (or narrower) network than the preset's, everything else as the preset says
        common["backbone_options"] = {**load_preset(task).network.get("options", {}), "filters": list(filters)}
    if dry:
        common.update(max_cases=6, max_steps_per_epoch=2)
    # calibration on 8 cases, 6 steps per epoch: the time of one DSD optimiser step once data and kernels are warm
    # (plain steps are cheaper, so every arm fits)
    cal_steps = 6
    Trainer(TrainConfig(output=str(cal_dir), epochs=2, val_every=2, dsd="dsd",
                        **{**common, "max_cases": 8, "max_steps_per_epoch": cal_steps})).fit()
    hist = json.loads((cal_dir / "history.json").read_text())
    step_s = float(hist[-1]["seconds"]) / cal_steps
    preset = load_preset(task)
    n_train = round(len(list_cases(data, channels=preset.channels)) * 0.8)
    epoch_s = step_s * math.ceil(n_train / preset.training["batch_size"])
    budget = minutes * 60 / len(arms) - 90  # per arm: caching the dataset and the last validation
    epochs = 3 if dry else max(5, int(budget / (epoch_s * 1.15)))  # 15 %: the validations along the way
    val_every = max(1, epochs // 10)
    result = {"task": task, "dataset": manifest["dataset"], "calibration_step_s": step_s, "planned_epoch_s": epoch_s,
              "epochs": epochs, "val_every": val_every, "init_from": init_from, "lr": lr, "filters": filters, "seed": seed,
              "arms": {}}
    for arm in arms:
        run_dir = Path(f"/tmp/dsdseg-run-{arm}")
        shutil.rmtree(run_dir, ignore_errors=True)
        t1 = time.perf_counter()
        snapshots = Snapshots(run_dir, out, arm)
        snapshots.start()
        try:
            try:
                Trainer(TrainConfig(output=str(run_dir), epochs=epochs, val_every=val_every, dsd=arm,
                                    init_from=init_from, lr=lr, **common)).fit()
            finally:  # no snapshot may write while the final copy below does
                snapshots.done.set()
                snapshots.join()
            hist = json.loads((run_dir / "history.json").read_text())
            best = max((h.get("val_dice", float("nan")) for h in hist if "val_dice" in h), default=None)
            result["arms"][arm] = {"wall_s": time.perf_counter() - t1, "best_val_dice": best,
                                   "files": write_run(run_dir, out, arm)}
        except Exception:  # noqa: BLE001 (one failed arm must not cost the others)
            result["arms"][arm] = {"error": traceback.format_exc()[-3000:]}
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-min", type=float, default=5.5, help="wall minutes for the training schedule")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--dry-run", action="store_true", help="on this CPU: no GPU checks, a few training steps")
    ap.add_argument("--arms", nargs="+", default=["dsd"], choices=["plain", "ds", "dsd"],
                    help="train each, same epochs and seed (e.g. dsd plain for the comparison)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (the split is the seed's too, as on the CPU: "
                    "a second seed of a comparison)")
    ap.add_argument("--checks-only", action="store_true", help="the GPU checks and timings, no training")
    ap.add_argument("--init-from", help="a model folder (e.g. Resources/Models/cardiac-dsd) that starts every arm")
    ap.add_argument("--lr", type=float, help="learning rate (default: the preset's)")
    ap.add_argument("--filters", type=int, nargs="+", help="the backbone's filters per stage instead of the preset's "
                    "(a wider network; with --init-from, the filters of that model: e.g. a wide run begun on a CPU, "
                    "packed with pack.py --include-model; the trainer refuses a model of another network)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        sys.exit("no CUDA device here: use --dry-run on a CPU machine")
    dev = "cuda" if cuda else "cpu"
    session = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__, "python": platform.python_version(),
               "device": torch.cuda.get_device_name(0) if cuda else "cpu (dry run)", "checks": {}}
    save = lambda: (out / "session.json").write_text(json.dumps(session, indent=1))  # noqa: E731
    if cuda:
        for name, fn in (("cuda_equals_cpu", check_cuda_equals_cpu), ("amp_step", check_amp_step),
                         ("oom_fallback", check_oom_fallback), ("timings", timings)):
            t0 = time.perf_counter()
            try:
                session["checks"][name] = fn(dev)
            except Exception:  # noqa: BLE001 (one failed check must not cost the training)
                session["checks"][name] = {"pass": False, "error": traceback.format_exc()[-2000:]}
            session["checks"][name]["seconds"] = round(time.perf_counter() - t0, 1)
            print(name, json.dumps(session["checks"][name])[:400], flush=True)
            save()
    if args.checks_only:
        session["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        save()
        return
    manifest = json.loads((REPO / ".device" / "manifest.json").read_text())
    try:
        session["training"] = train(manifest, out, args.train_min, dev, args.workers if cuda else 0, args.dry_run,
                                    tuple(args.arms), args.init_from, args.lr, args.filters, args.seed)
    except Exception:  # noqa: BLE001
        session["training"] = {"error": traceback.format_exc()[-3000:]}
    session["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    save()
    print(json.dumps(session.get("training"), indent=1))


if __name__ == "__main__":
    main()
