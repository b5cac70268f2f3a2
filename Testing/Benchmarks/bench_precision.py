#!/usr/bin/env python
"""Training-step time in fp32 and under bf16 autocast (the CPU default where bf16 is native), measured interleaved.

Usage:  .venv/bin/python Testing/Benchmarks/bench_precision.py [--tasks hippocampus cardiac brain_tumour] [--reps 5]
            [--threads 1 2]

For each preset: its network (full DSD), patch size and batch (batch_size x samples_per_volume patches, as a
training step sees them), random inputs, one AdamW step (forward under autocast, DSD loss in fp32, backward), fp32
and bf16 alternating so that both see the same machine load; median of ``--reps``. Prints a Markdown table with the
ratio bf16 / fp32 per thread count, and the check training runs before a bf16 run (each convolution alone at its
shape, bf16 against fp32; a CPU whose bf16 kernels are wrong for a layer trains that task in fp32). Whether bf16 training reaches the same Dice is a separate, paired measurement
(bench_dsd_study.py runs in fp32 and in bf16, same seeds and cases).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from DSDSegmentationLib.engine import DSDConfig, DSDLoss, DSDNet
from DSDSegmentationLib.engine.runtime import tune_cpu_allocator
from DSDSegmentationLib.engine.tasks import load_preset
from DSDSegmentationLib.engine.training import (BF16_CONV_TOLERANCE, bf16_convolution_error, cpu_has_native_bf16,
                                                training_forward)


def bench(task: str, reps: int) -> dict:
    preset = load_preset(task)
    net_cfg = preset.network_config()
    batch = preset.training["batch_size"] * preset.training["samples_per_volume"]
    torch.manual_seed(0)
    model = DSDNet(net_cfg, DSDConfig()).train()
    loss_fn = DSDLoss(model.dsd_config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, net_cfg.in_channels, *net_cfg.patch_size)
    y = torch.randint(0, net_cfg.out_channels, (batch, 1, *net_cfg.patch_size))

    def step(bf16: bool) -> float:
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(training_forward(model, x, "bf16" if bf16 else "fp32"), y).backward()
        opt.step()
        return time.perf_counter() - t0

    for bf16 in (False, True):  # warm-up (oneDNN picks its kernels on the first calls)
        step(bf16), step(bf16)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(reps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    # what training checks before its first bf16 step: each convolution alone at its shape, bf16 against fp32
    err, where = bf16_convolution_error(model, torch.zeros(1, net_cfg.in_channels, *net_cfg.patch_size))
    return {"task": task, "backbone": net_cfg.backbone, "patch": "x".join(map(str, net_cfg.patch_size)), "batch": batch,
            "fp32": fp32, "bf16": bf16, "check": f"{err:.3g}" + ("" if err <= BF16_CONV_TOLERANCE else f" wrong: {where}")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", nargs="+", default=["hippocampus", "cardiac", "brain_tumour"])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    args = ap.parse_args()
    tuned = tune_cpu_allocator()
    print(f"# torch {torch.__version__}, {platform.machine()}, native bf16: {cpu_has_native_bf16()}, median of "
          f"{args.reps} interleaved steps, allocator tuned: {tuned}")
    print("| task | backbone | patch × batch | threads | step fp32 (s) | step bf16 (s) | bf16 / fp32 | bf16 check: worst "
          "convolution (relative error) |")
    print("|---|---|---|---:|---:|---:|---:|---|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for task in args.tasks:
            r = bench(task, args.reps)
            print(f"| {task} | {r['backbone']} | {r['patch']} × {r['batch']} | {threads} | {r['fp32']:.3f} | "
                  f"{r['bf16']:.3f} | {r['bf16'] / r['fp32']:.2f} | {r['check']} |", flush=True)


if __name__ == "__main__":
    main()
