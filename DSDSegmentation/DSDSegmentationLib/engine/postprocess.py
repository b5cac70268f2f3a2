"""Post-processing of predicted label maps, as a model's card asks for it (``preset.postprocessing``).

nnU-Net keeps the largest connected component only where it raises the validation Dice; our models say so in their
preset, measured with ``Testing/Benchmarks/bench_postprocessing.py`` (README, *Post-processing*)."""

from __future__ import annotations

import numpy as np

MODES = ("foreground", "per_label")


def _largest(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    comp, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))  # 26-connectivity
    if n <= 1:
        return mask
    sizes = np.bincount(comp.ravel())
    sizes[0] = 0
    return comp == int(sizes.argmax())


def keep_largest_component(labels: np.ndarray, mode: str) -> np.ndarray:
    """Everything outside the largest connected region of the foreground (``foreground``: touching labels stay
    together), or of each label (``per_label``), set to 0."""
    if mode not in MODES:
        raise ValueError(f"unknown post-processing {mode!r}; known: {', '.join(MODES)}")
    out = labels.copy()
    if mode == "foreground":
        out[~_largest(labels > 0)] = 0
        return out
    for v in (int(x) for x in np.unique(labels) if x != 0):
        m = labels == v
        out[m & ~_largest(m)] = 0
    return out
