"""How well the sequence-order check tells a wrong input order (leave-one-out over a multi-sequence dataset).

    .venv/bin/python Testing/Benchmarks/bench_sequence_check.py --data ../shared/data/BraTS2018_2mm \\
        --channels FLAIR T1 T1c T2 [--safety 2]

Per case, the template of the other cases judges the case in its true order and in every order it could be given
in. Prints the threshold (``safety`` × the largest true-order excess, as ``package_model.py`` stores it in a card),
the false alarms, and for each pair of inputs how many cases are flagged when those two are swapped."""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "DSDSegmentation"))

from DSDSegmentationLib.engine.data import list_cases  # noqa: E402
from DSDSegmentationLib.engine.sequence_check import (MIN_FLAGGED, permuted, calibrate, excess_over_best,  # noqa: E402
                                                      features_of_cases)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset folder (dataset.json) with these channels")
    ap.add_argument("--channels", nargs="+", required=True, help="channel names in the model's order")
    ap.add_argument("--safety", type=float, default=2.0)
    a = ap.parse_args()
    c = len(a.channels)
    f = np.array(features_of_cases([case.images for case in list_cases(a.data, channels=a.channels)]))
    threshold, measured = calibrate(list(f), c, a.safety)
    print(f"{Path(a.data).name} ({' '.join(a.channels)}): {len(f)} cases, threshold {threshold:.3f}"
          + ("" if measured["two_swapped_flagged"] >= MIN_FLAGGED else " - too weak: a card would not keep it"))
    print("  " + ", ".join(f"{k} {v}" for k, v in measured.items()))
    for p in itertools.permutations(range(c)):
        if sum(x != y for x, y in enumerate(p)) != 2:
            continue
        hits = 0
        for i in range(len(f)):
            rest = np.delete(f, i, axis=0)
            hits += excess_over_best(permuted(f[i], c, p), rest.mean(0), rest.std(0) + 1e-3, c)[0] > threshold
        i, j = [k for k in range(c) if p[k] != k]
        print(f"  {a.channels[i]} and {a.channels[j]} swapped: flagged in {hits} of {len(f)}")


if __name__ == "__main__":
    main()
