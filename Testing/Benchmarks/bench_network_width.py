#!/usr/bin/env python
"""What a wider network costs at inference on the CPU: parameters and seconds per case, widths side by side.

Usage:  .venv/bin/python Testing/Benchmarks/bench_network_width.py --task cardiac \
            --filters 8,16,32,64,128 16,32,64,128,256 32,64,128,256,320 [--cases 3] [--reps 3] [--threads 2]

Each width is the task preset's network with only its filters changed (random weights: the time does not depend on
them), run through the same Predictor as a shipped model (sliding window, the preset's overlap and blending) on the
first validation-sized cases of the task's dataset in ../shared/data. Widths are interleaved per repetition, so a
busy machine slows all of them alike; read the ratio to the first width. Used to size a network before training it
(the cardiac target is <= 5 s per cine frame, warm, 2 cores).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from package_model import FOLDERS  # noqa: E402

from DSDSegmentationLib.engine import DSDConfig, DSDNet  # noqa: E402
from DSDSegmentationLib.engine.data import find_shared_data, list_cases  # noqa: E402
from DSDSegmentationLib.engine.inference import Predictor  # noqa: E402
from DSDSegmentationLib.engine.models import LoadedModel  # noqa: E402
from DSDSegmentationLib.engine.tasks import load_preset  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="cardiac", choices=sorted(FOLDERS))
    ap.add_argument("--filters", nargs="+", required=True, help="comma-separated filters per stage, one per width")
    ap.add_argument("--cases", type=int, default=3)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = load_preset(args.task)
    cases = list_cases(find_shared_data() / FOLDERS[args.task], channels=preset.channels)[: args.cases]
    widths = [[int(f) for f in w.split(",")] for w in args.filters]
    predictors = []
    for filters in widths:
        net_config = preset.network_config(options={**preset.network.get("options", {}), "filters": filters})
        backbone = DSDNet(net_config, DSDConfig.preset("plain")).export_backbone().eval()
        model = LoadedModel(backbone, preset, net_config, f"random {filters}", {})
        predictors.append((filters, sum(p.numel() for p in backbone.parameters()), Predictor(model, device="cpu")))
    times: dict[int, list[float]] = {i: [] for i in range(len(widths))}
    for _, _, p in predictors:  # warm-up: the first call pays for allocations and kernel choice
        p.predict(cases[0].images)
    for _ in range(args.reps):
        for c in cases:
            for i, (_, _, p) in enumerate(predictors):
                t0 = time.perf_counter()
                p.predict(c.images)
                times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[0])
    print(f"# {args.task}: CPU inference per case, {args.threads} thread(s), median of {args.reps} x {len(cases)} cases, "
          f"widths interleaved; random weights")
    print("| filters | parameters | seconds per case | ratio to the first |")
    print("|---|---:|---:|---:|")
    for i, (filters, n, _) in enumerate(predictors):
        med = statistics.median(times[i])
        print(f"| {'-'.join(map(str, filters))} | {n / 1e6:.2f} M | {med:.2f} | {med / base:.2f} |")


if __name__ == "__main__":
    main()
