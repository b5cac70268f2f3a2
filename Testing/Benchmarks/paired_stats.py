"""Paired per-case comparison of two arms over (seed, case) pairs, shared by the benchmark reports."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def paired_difference(a: Iterable[dict[str, Any]], b: Iterable[dict[str, Any]], digits: int = 1) -> str:
    """``a`` and ``b`` are result records (``{"seed": s, "dice": {case: Dice}}``); the pairs are the (seed, case)
    keys both have. Returns "+x.x pts (n=…, Wilcoxon p=…)", or "–" with fewer than 5 pairs."""
    from scipy.stats import wilcoxon

    da = {(r["seed"], c): d for r in a for c, d in r["dice"].items()}
    db = {(r["seed"], c): d for r in b for c, d in r["dice"].items()}
    keys = sorted(set(da) & set(db))
    if len(keys) < 5:
        return "–"
    diff = np.array([da[k] - db[k] for k in keys])
    p = wilcoxon(diff).pvalue if np.any(diff) else 1.0
    return f"{100 * diff.mean():+.{digits}f} pts (n={len(keys)}, Wilcoxon p={p:.2g})"
