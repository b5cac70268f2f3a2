"""Are the MRI sequences given in the order the model expects? A statistical check, a warning, never an error.

Each model input is one MRI sequence (e.g. FLAIR, T1, T1c, T2). Two volumes swapped in the panel or on the command
line run without any error and give a wrong segmentation. The sequences differ in how they relate to each other and
in the shape of their intensity histograms inside the brain: T1 and T1c correlate strongly, T2 correlates negatively
with T1, FLAIR lies in between; T1 is left-skewed, T2 right-skewed. From the training cases a model package keeps a
template of these statistics (per-channel skewness and log kurtosis, pairwise correlations, each with its mean and
spread over the cases). For a new input the statistics of the given order and of every swap of two inputs are
compared with the template; when a swap fits clearly better than the given order (by more than the card's
``threshold``, set from the training cases where the true order is known), the caller gets a note naming the two
inputs that look swapped.

It is a warning because it can be wrong: measured leave-one-out on BraTS 2018 (``Testing/Benchmarks/
bench_sequence_check.py``). Inputs that are not skull-stripped or come from another protocol may fit no order well;
then nothing is said. With two channels the correlation is the same in both orders, so only the histogram shape
decides, which is weaker (the card's ``measured`` field records the rates of each model).
"""

from __future__ import annotations

import itertools
from typing import Any, Sequence

import numpy as np

KIND = "sequence_order"
MAX_VOXELS = 2_000_000  # larger volumes are subsampled (a 1 mm BraTS volume: every 2nd voxel; a 2 mm one: all)
MIN_VOXELS = 1000  # fewer voxels inside the joint mask: no statistics worth comparing
MAX_MASK_FRACTION = 0.8  # a mask this large is no brain mask (no constant background: not skull-stripped)
MAX_CHANNELS = 6  # calibrating tries all 720 orders of 6 inputs
# excess (mean squared standardised distance) below which the given order is never questioned: on BraTS 2018, cases in
# their true order fit up to 0.14 worse than their best order, two swapped sequences mostly 0.3-2.5 worse
MIN_THRESHOLD = 0.25


def sequence_features(image: np.ndarray, order: Sequence[int] | None = None) -> np.ndarray | None:
    """Feature vector of a (C, x, y, z) image with its channels taken in ``order``: per channel skewness and log
    kurtosis, then the correlations of every channel pair (upper triangle, row-major), all inside the voxels where
    no channel holds its constant background (the brain of a skull-stripped scan; background 0 or, in a scan
    someone already z-scored, its constant minimum). None when that mask is too small, or covers most
    of the volume (no constant background, so no brain mask)."""
    image = np.asarray(image)
    step = max(1, round((float(np.prod(image.shape[1:])) / MAX_VOXELS) ** (1 / 3)))
    if step > 1:  # statistics of a histogram and of correlations: every step-th voxel along each axis is enough
        image = image[:, ::step, ::step, ::step]
    c = image.shape[0]
    order = list(range(c)) if order is None else list(order)
    from .transforms import constant_background  # the background rule of the preprocessing (0 or another constant)

    mask = np.ones(image.shape[1:], dtype=bool)
    for ch in image:
        bg = constant_background(ch)
        mask &= ch != (0.0 if bg is None else bg)
    if int(mask.sum()) < MIN_VOXELS or mask.mean() > MAX_MASK_FRACTION:
        return None
    z = []
    for k in order:
        v = image[k][mask].astype(np.float64)
        sd = v.std()
        if sd == 0:
            return None
        z.append((v - v.mean()) / sd)
    return _features(z)


def _features(z: list[np.ndarray]) -> np.ndarray:
    skew = [float(np.mean(v ** 3)) for v in z]
    logkurt = [float(np.log(np.mean(v ** 4))) for v in z]
    corr = [float(np.mean(z[a] * z[b])) for a, b in itertools.combinations(range(len(z)), 2)]
    return np.array(skew + logkurt + corr)


def permuted(features: np.ndarray, c: int, order: Sequence[int]) -> np.ndarray:
    """The features of the same image with its channels taken in ``order`` (no need to recompute statistics)."""
    skew, logkurt, corr = features[:c], features[c:2 * c], features[2 * c:]
    pairs = {p: corr[i] for i, p in enumerate(itertools.combinations(range(c), 2))}
    new_corr = [pairs[tuple(sorted((order[a], order[b])))] for a, b in itertools.combinations(range(c), 2)]
    return np.concatenate([skew[list(order)], logkurt[list(order)], new_corr])


def make_template(features: list[np.ndarray], names: Sequence[str], threshold: float, measured: dict | None = None) -> dict[str, Any]:
    """The card's ``input_check`` entry from the features of training cases (their channels in the true order)."""
    f = np.array(features)
    return {"kind": KIND, "channels": list(names), "cases": len(features),
            "mean": [round(float(v), 5) for v in f.mean(0)], "std": [round(float(v), 5) for v in f.std(0) + 1e-3],
            "threshold": round(float(threshold), 4), **({"measured": measured} if measured else {})}


def swaps(c: int) -> list[tuple[int, ...]]:
    """The given order and every order with two inputs exchanged: the mistake a user makes when picking volumes."""
    out = [tuple(range(c))]
    for a, b in itertools.combinations(range(c), 2):
        p = list(range(c))
        p[a], p[b] = b, a
        out.append(tuple(p))
    return out


def order_scores(features: np.ndarray, mean: Sequence[float], std: Sequence[float], c: int) -> dict[tuple[int, ...], float]:
    """Mean squared standardised distance from the template for the given order and each swap of two inputs."""
    mu, sd = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    return {p: float(np.mean(((permuted(features, c, p) - mu) / sd) ** 2)) for p in swaps(c)}


def excess_over_best(features: np.ndarray, mean: Sequence[float], std: Sequence[float], c: int) -> tuple[float, tuple[int, ...]]:
    """How much worse the given order fits than the best of it and its swaps, and that best order."""
    scores = order_scores(features, mean, std, c)
    best = min(scores, key=lambda p: scores[p])
    return scores[tuple(range(c))] - scores[best], best


def check_order(image: np.ndarray, template: dict[str, Any] | None, names: Sequence[str] | None = None,
                given: Sequence[str] | None = None) -> str | None:
    """A note when the channels of ``image`` look like they were given in another order than the model's; None
    when the order fits, when the model has no template or when the image gives no usable statistics.
    ``given``: how the user calls each input (node or file names), for the message."""
    if not template or template.get("kind") != KIND:
        return None
    c = int(np.asarray(image).shape[0])
    names = list(names or template.get("channels") or [f"input {k + 1}" for k in range(c)])
    if c < 2 or c > MAX_CHANNELS or len(template.get("mean", [])) != 2 * c + c * (c - 1) // 2:
        return None
    features = sequence_features(image)
    if features is None:
        return None
    excess, best = excess_over_best(features, template["mean"], template["std"], c)
    if excess <= float(template["threshold"]):
        return None
    given = list(given) if given and len(given) == c else None
    label = (lambda j: f"{given[j]} (given as {names[j]})") if given else (lambda j: f"the {names[j]} input")
    a, b = [k for k in range(c) if best[k] != k]  # best: a swap of two inputs
    return (f"{label(a)} and {label(b)} look swapped: the first looks like {names[b]}, the second like {names[a]} "
            f"(the model expects {', '.join(names)} in "
            "that order; check which volume is which: this check compares intensity statistics with the training "
            "scans and can be wrong)")


def calibrate(features: list[np.ndarray], c: int, safety: float = 2.0) -> tuple[float, dict[str, Any]]:
    """Threshold and measured rates, leave-one-out over cases whose channels are in the true order.

    Each case is scored against the template of the other cases in its true order and in every other order it
    could have been given in. The threshold is ``safety`` times the largest excess of a true order over the best
    one (no false alarm on these cases, with room for scans unlike them), at least ``MIN_THRESHOLD`` (when the true
    order fits best in every case, the largest excess is 0 and says nothing about scans from elsewhere); the rates say how often a wrong order is
    flagged at that threshold: two inputs swapped, and any wrong order."""
    n = len(features)
    if n < 3:
        raise ValueError("calibrating the sequence check needs at least 3 cases")
    f = np.array(features)
    orders = list(itertools.permutations(range(c)))
    excess: dict[tuple[int, ...], list[float]] = {p: [] for p in orders}
    for i in range(n):
        rest = np.delete(f, i, axis=0)
        mu, sd = rest.mean(0), rest.std(0) + 1e-3
        for given in orders:  # the case presented with its channels in order `given`
            e, _ = excess_over_best(permuted(f[i], c, given), mu, sd, c)
            excess[given].append(e)
    identity = tuple(range(c))
    threshold = max(safety * max(excess[identity]), MIN_THRESHOLD)
    swaps = [p for p in orders if sum(a != b for a, b in zip(p, identity)) == 2]
    rate = lambda ps: round(float(np.mean([np.mean(np.array(excess[p]) > threshold) for p in ps])), 3)  # noqa: E731
    measured = {"cases": n, "safety": safety, "true_order_best": int(sum(e <= 1e-12 for e in excess[identity])),
                "false_alarms": rate([identity]), "two_swapped_flagged": rate(swaps),
                "any_wrong_order_flagged": rate([p for p in orders if p != identity])}
    return threshold, measured


MIN_FLAGGED = 0.5  # a check that flags fewer swapped pairs than this (leave-one-out) is not worth a template


def features_of_cases(cases: list[list[str]]) -> list[np.ndarray]:
    """Features of cases given as lists of channel files (cases without usable statistics are left out)."""
    from .io import load_channels

    features = []
    for files in cases:
        image, _ = load_channels(list(files), what=str(files[0]), resample=True)
        f = sequence_features(image)
        if f is not None:
            features.append(f)
    return features


def template_from_cases(cases: list[list[str]], names: Sequence[str], safety: float = 2.0) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """The ``input_check`` entry for a model card from its training cases (each a list of channel files in the
    model's order), or None when leave-one-out says the check would not tell a swap (e.g. FLAIR vs T1c alone);
    always the measured rates."""
    features = features_of_cases(cases)
    threshold, measured = calibrate(features, len(names), safety)
    if measured["two_swapped_flagged"] < MIN_FLAGGED:
        return None, measured
    return make_template(features, names, threshold, measured), measured
