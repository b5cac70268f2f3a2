#!/usr/bin/env python
"""Does a cardiac model hold when the cine series has another in-plane spacing, or its voxels in another order?

Usage:  .venv/bin/python Testing/Benchmarks/bench_cardiac_spacing.py --model Resources/Models/cardiac-dsd \
            [--spacings 1.0 1.8] [--orders mirror-i mirror-j transpose-ij] [--cases 20] [--out output/bench_cardiac_spacing]

Each validation case of the model (its card's or run's split; ACDC read with its true pixdim spacing) is resampled
in-plane to each spacing (image: linear, labels: nearest; slices unchanged, same physical extent), segmented, and
scored against the resampled manual labels; the native-spacing Dice is the reference. Prints mean Dice per class
and spacing, the largest drop from native, and the warm CPU seconds per frame. Target: within 0.02 of native.

``--orders``: the same series stored with its rows or columns reversed, or rows and columns swapped (image, labels
and affine together: the anatomy stays where it is), as a DICOM cine series may come into Slicer. The cardiac preset
does not reorient (its slice axis must stay the third), so the network sees the mirrored or transposed array.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import affine_transform

from DSDSegmentationLib.engine.cards import read_model_card
from DSDSegmentationLib.engine.data import Case, find_shared_data, list_cases
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.io import load_volume, permute_axes
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize


def resample_inplane(path: str, spacing: float, out: Path, order: int) -> Path:
    """The volume on a grid with ``spacing`` mm along its first two axes (same extent and orientation)."""
    data, affine = load_volume(path)
    old = np.linalg.norm(affine[:3, :3], axis=0)
    scale = np.array([spacing / old[0], spacing / old[1], 1.0])
    shape = tuple(max(1, int(round(n / s))) for n, s in zip(data.shape, scale))
    new_affine = affine.copy()
    new_affine[:3, :3] = affine[:3, :3] * scale
    # keep the physical centre of the first voxel's corner: shift by half a voxel difference
    new_affine[:3, 3] = affine[:3, 3] + affine[:3, :3] @ ((scale - 1) / 2)
    m = np.linalg.inv(affine) @ new_affine
    arr = affine_transform(np.asarray(data, dtype=np.float32), m[:3, :3], offset=m[:3, 3], output_shape=shape,
                           order=order, mode="nearest")
    img = nib.Nifti1Image(np.rint(arr).astype(np.uint8) if order == 0 else arr.astype(np.float32), new_affine)
    img.set_sform(new_affine, code=1)
    img.set_qform(new_affine, code=1)
    nib.save(img, str(out))
    return out


ORDERS = {"mirror-i": "rows reversed (i)", "mirror-j": "columns reversed (j)", "transpose-ij": "i and j swapped",
          "slices-first": "slices along the first axis"}


def reorder(path: str, order: str, out: Path) -> Path:
    """The volume with its voxels in another in-plane order and the affine that keeps every voxel where it was."""
    data, affine = load_volume(path)
    move = np.eye(4)
    if order == "mirror-i":
        data, move[0, 0], move[0, 3] = data[::-1], -1.0, data.shape[0] - 1
    elif order == "mirror-j":
        data, move[1, 1], move[1, 3] = data[:, ::-1], -1.0, data.shape[1] - 1
    elif order in ("transpose-ij", "slices-first"):  # the engine's own axis permutation (io.permute_axes)
        data, affine = permute_axes(np.asarray(data), affine, (1, 0, 2) if order == "transpose-ij" else (2, 0, 1))
    else:
        raise SystemExit(f"unknown order {order!r}; known: {', '.join(ORDERS)}")
    new_affine = affine @ move
    arr = np.ascontiguousarray(data)
    img = nib.Nifti1Image(np.rint(arr).astype(np.uint8) if out.name.endswith("_lab.nii.gz") else arr.astype(np.float32),
                          new_affine)
    img.set_sform(new_affine, code=1)
    img.set_qform(new_affine, code=1)
    nib.save(img, str(out))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="model package or training run folder")
    ap.add_argument("--spacings", nargs="*", type=float, default=[1.0, 1.8])
    ap.add_argument("--orders", nargs="*", default=[], choices=sorted(ORDERS))
    ap.add_argument("--cases", type=int, default=20)
    ap.add_argument("--out", default="output/bench_cardiac_spacing")
    args = ap.parse_args()
    model = Path(args.model)
    card = read_model_card(model)
    if (model / "split.json").is_file():
        val = [Case(**c) for c in json.loads((model / "split.json").read_text())["val"]][: args.cases]
    else:
        by_id = {c.id: c for c in list_cases(find_shared_data() / "ACDC_subset")}
        val = [by_id[i] for i in card["split"]["val_ids"]][: args.cases]
    predictor = Predictor(model, device="cpu")
    labels = {int(k): v for k, v in card["preset"]["labels"].items()}
    out = Path(args.out)
    results, secs = {}, []
    for spacing in [None, *args.spacings, *args.orders]:
        tag = "native" if spacing is None else f"{spacing:g} mm" if not isinstance(spacing, str) else ORDERS[spacing]
        folder = out / (tag if spacing is None or not isinstance(spacing, str) else spacing).replace(" ", "")
        folder.mkdir(parents=True, exist_ok=True)
        pairs = []
        for c in val:
            img, lab = c.images[0], c.label
            if isinstance(spacing, str):
                img = str(reorder(img, spacing, folder / f"{c.id}_img.nii.gz"))
                lab = str(reorder(lab, spacing, folder / f"{c.id}_lab.nii.gz"))
            elif spacing is not None:
                img = str(resample_inplane(img, spacing, folder / f"{c.id}_img.nii.gz", order=1))
                lab = str(resample_inplane(lab, spacing, folder / f"{c.id}_lab.nii.gz", order=0))
            pred = folder / f"{c.id}_pred.nii.gz"
            t0 = time.perf_counter()
            predictor.predict_to_file([img], pred)
            secs.append(time.perf_counter() - t0)
            pairs.append((c.id, str(pred), lab))
        s = summarize(evaluate_files(pairs, labels))
        results[tag] = {n: s[n]["dice"]["mean"] for n in s}
    names = [labels[v] for v in sorted(labels) if v]
    print(f"# {len(val)} validation cases of {model.name}; Dice against the manual labels resampled the same way")
    print("| in-plane spacing or voxel order | " + " | ".join(names) + " | mean |")
    print("|---|" + "---:|" * (len(names) + 1))
    for tag, r in results.items():
        print(f"| {tag} | " + " | ".join(f"{r[n]:.4f}" for n in names) + f" | {np.mean([r[n] for n in names]):.4f} |")
    native = np.mean([results["native"][n] for n in names])
    drop = max(native - np.mean([r[n] for n in names]) for t, r in results.items() if t != "native")
    print(f"largest drop of the mean Dice from native: {drop:.4f} (target <= 0.02); "
          f"median {statistics.median(secs[1:]):.2f} s per frame (warm, CPU, {len(secs)} frames)")
    (out / "results.json").write_text(json.dumps({"dice": results, "drop": drop, "median_s": statistics.median(secs[1:])},
                                                 indent=2))


if __name__ == "__main__":
    main()
