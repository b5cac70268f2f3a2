#!/usr/bin/env python
"""DSD overhead per backbone: parameters, training-step time and eval time, DSD vs plain, measured interleaved.

Usage:  .venv/bin/python Testing/Benchmarks/bench_dsd_overhead.py [--reps 8] [--backbones basicunet dynunet ...]
            [--precision fp32|bf16]   (bf16: forward under CPU bf16 autocast, loss in fp32, as training does)
Prints a Markdown table (the one in README). Targets: step ratio <= 1.10, parameter overhead <= 1 %, eval ratio 1.00.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from DSDSegmentationLib.engine import DSDConfig, DSDLoss, DSDNet, NetworkConfig
from DSDSegmentationLib.engine.runtime import tune_cpu_allocator
from DSDSegmentationLib.engine.training import training_forward

# (backbone, patch, batch, options): hippocampus-sized patches for the CNNs, CPU-feasible sizes for the rest
CONFIGS = {
    "basicunet": ((32, 32, 32), 4, {}),
    "dynunet": ((48, 48, 48), 2, {"filters": (16, 32, 64, 128, 256)}),
    "unetr": ((64, 64, 64), 1, {"feature_size": 16}),
    "swinunetr": ((64, 64, 64), 1, {"feature_size": 12}),
    "vnet": ((64, 64, 64), 1, {}),
}
K = 3


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name: str, reps: int, bf16: bool = False) -> dict:
    patch, batch, opts = CONFIGS[name]
    net = NetworkConfig(name, 1, K, patch, opts)
    models = {mode: DSDNet(net, DSDConfig.preset(mode)) for mode in ("plain", "dsd")}
    losses = {mode: DSDLoss(m.dsd_config) for mode, m in models.items()}
    opts_ = {mode: torch.optim.AdamW(m.parameters(), lr=1e-4) for mode, m in models.items()}
    x = torch.randn(batch, 1, *patch)
    y = torch.randint(0, K, (batch, 1, *patch))

    def step(mode: str) -> None:
        m = models[mode].train()
        opts_[mode].zero_grad(set_to_none=True)
        losses[mode](training_forward(m, x, "bf16" if bf16 else "fp32"), y).backward()
        opts_[mode].step()

    def infer(mode: str) -> None:
        m = models[mode].eval()
        with torch.no_grad():
            m(x)

    train_t: dict[str, list[float]] = {"plain": [], "dsd": []}
    eval_t: dict[str, list[float]] = {"plain": [], "dsd": []}
    for mode in ("plain", "dsd"):  # warm-up
        step(mode), infer(mode)
    for i in range(reps):  # interleaved, alternating which goes first
        order = ("plain", "dsd") if i % 2 == 0 else ("dsd", "plain")
        for mode in order:
            train_t[mode].append(timed(lambda: step(mode)))
        for mode in order:
            eval_t[mode].append(timed(lambda: infer(mode)))
    p_plain = models["plain"].num_parameters()["total"]
    p_dsd = models["dsd"].num_parameters()["total"]
    med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in (("train", train_t), ("eval", eval_t))}
    return {
        "backbone": name,
        "patch": "x".join(map(str, patch)),
        "batch": batch,
        "params_plain": p_plain,
        "params_dsd": p_dsd,
        "overhead_pct": 100.0 * (p_dsd - p_plain) / p_plain,
        "step_plain": med["train"]["plain"],
        "step_dsd": med["train"]["dsd"],
        "step_ratio": med["train"]["dsd"] / med["train"]["plain"],
        "eval_plain": med["eval"]["plain"],
        "eval_dsd": med["eval"]["dsd"],
        "eval_ratio": med["eval"]["dsd"] / med["eval"]["plain"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--backbones", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="training-step arithmetic")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tuned = tune_cpu_allocator()  # as the dsdseg worker does; applies to plain and DSD alike
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"K={K}, median of {args.reps} interleaved repetitions, allocator tuned: {tuned}, steps in {args.precision}")
    print("| backbone | patch × batch | params plain | params DSD | overhead | step plain (s) | step DSD (s) | step ratio | eval plain (s) | eval DSD (s) | eval ratio |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.backbones:
        r = bench(name, args.reps, args.precision == "bf16")
        print(f"| {r['backbone']} | {r['patch']} × {r['batch']} | {r['params_plain']:,} | {r['params_dsd']:,} | "
              f"{r['overhead_pct']:.3f} % | {r['step_plain']:.3f} | {r['step_dsd']:.3f} | {r['step_ratio']:.2f} | "
              f"{r['eval_plain']:.3f} | {r['eval_dsd']:.3f} | {r['eval_ratio']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
