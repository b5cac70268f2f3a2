"""``dsdseg``: the one entry point used from a shell and by the Slicer module's background worker."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .engine.errors import DSDError


def _cmd_backbones(args: argparse.Namespace) -> int:
    from .engine.networks import BACKBONES

    for name, cls in BACKBONES.items():
        spec = cls(1, 3, (64, 64, 64), {})
        print(f"{name}: {cls.description}  (patch multiple of {spec.divisor()}, shared heads by default: {cls.default_share_heads})")
        print(f"  {'head':5s} {'role':4s} {'module':22s} {'ch':>5s} {'down':>7s}")
        for row in spec.tap_table():
            mark = "  <- teacher" if row["teacher"] else ""
            print(f"  {row['head']:5s} {row['role']:4s} {row['module']:22s} {row['channels']:5d} {row['scale']:>7s}{mark}")
    return 0


def _cmd_smoke(args: argparse.Namespace) -> int:
    from .engine.smoke import run_smoke

    result = run_smoke(args.data, backbone=args.backbone, steps=args.steps, cases=args.cases, seed=args.seed)
    ok = result["dsd"]["loss_last5"] < result["dsd"]["loss_first5"] and result["export_identical"]
    if args.json:
        print(json.dumps(result, indent=2))
    print("smoke run:", "OK" if ok else "FAILED (loss did not decrease or export differs)")
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsdseg", description="Dual self-distillation segmentation: engine commands")
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backbones", help="list the backbones and their DSD taps (stage, channels, scale)")
    b.set_defaults(func=_cmd_backbones)
    s = sub.add_parser("smoke", help="engine smoke run: DSD vs plain for a few steps on real hippocampus MRI")
    s.add_argument("--data", help="MSD Task04 folder (default: ../shared/data/Task04_Hippocampus)")
    s.add_argument("--backbone", default="basicunet")
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--cases", type=int, default=6)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--json", action="store_true", help="also print the result as JSON")
    s.set_defaults(func=_cmd_smoke)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .engine.runtime import tune_cpu_allocator

    tune_cpu_allocator()
    try:
        return int(args.func(args))
    except DSDError as e:
        print(f"dsdseg: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
