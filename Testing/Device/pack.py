#!/usr/bin/env python
"""Prepare what a GPU session carries (the device README: one short run, tree + carried paths <= 64 MiB).

Usage:  .venv/bin/python Testing/Device/pack.py --dataset ACDC_subset|BraTS2018_2mm|Task04_Hippocampus [--out .device]

Writes (ignored by git; name it in the run's ``carry``):
  .device/wheels/   pure-Python wheels the GPU image lacks (monai, nibabel, pynrrd) at the versions of .venv;
  .device/data/<dataset>/  ONE dataset (two do not fit) in its own layout (dataset.json, imagesTr, labelsTr),
      each image quantised to uint8 (affine, pixdim and qform/sform kept, so the loader's geometry rules read it
      as the original; zeros stay 0), labels unchanged. The range follows the task preset's normalisation, which
      runs per volume: for 'percentile' presets the range just outside the preset's percentiles (what lies
      beyond is clipped by the preset anyway), for z-score presets the volume's whole range (clipping would
      move the bright voxels). The check prints the largest difference after the preset's normalisation.
Refuses to finish if the tree plus .device would not travel (64 MiB).

The shipped models (56 MiB) leave no room for a dataset, so by default the models of OTHER tasks are held back for
the session: each such ``Resources/Models/<id>/`` is moved to ``.device-hold/`` (ignored) and taken out of git's
index (``git rm --cached``), so neither the working tree nor the index holds it and it does not travel. The task's
own model stays (``--init-from``), and the hippocampus model that the session's GPU checks run. Nothing is deleted: ``pack.py --restore`` (also run by ``unpack.py``) moves them
back and resets the index to HEAD for those paths; until then ``git status`` shows them as deleted — do not commit.
A model folder with changes not in HEAD is never held.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[2]
WHEELS = ("monai", "nibabel", "pynrrd")
LIMIT = 64 * 2**20
HOLD = ".device-hold"
ALWAYS_KEPT = ("hippocampus-dsd",)  # gpu_session.py's CUDA-vs-CPU, out-of-memory and timing checks run it
TASKS = {"ACDC_subset": "cardiac", "BraTS2018_2mm": "brain_tumour", "Task04_Hippocampus": "hippocampus"}


def tree_bytes(repo: Path = REPO) -> int:
    """What the device copies: tracked and untracked-not-ignored files that exist."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=repo, capture_output=True,
                           check=True).stdout.split(b"\0")
    return sum((repo / f.decode()).stat().st_size for f in files if f and (repo / f.decode()).is_file())


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, check=True, text=True).stdout


def hold_models(task: str, repo: Path = REPO) -> list[str]:
    """Move the shipped models of other tasks out of the tree and the index (see the module docstring)."""
    held_dir = repo / HOLD
    if held_dir.exists() and any(held_dir.iterdir()):
        sys.exit(f"{held_dir} is not empty: models are held from an earlier session; run pack.py --restore first")
    held = [card.parent.relative_to(repo).as_posix() for card in sorted((repo / "Resources" / "Models").glob("*/model.json"))
            if json.loads(card.read_text(encoding="utf-8")).get("task") != task and card.parent.name not in ALWAYS_KEPT]
    changed = [rel for rel in held if git(repo, "status", "--porcelain", "--", rel).strip()]
    if changed:  # checked for all before any moves: a refusal leaves everything where it was
        sys.exit(f"{', '.join(changed)}: changes that are not committed; commit them (or use --keep-models) first")
    for rel in held:
        (held_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (repo / rel).rename(held_dir / rel)
        git(repo, "rm", "-r", "-q", "--cached", "--", rel)
    return held


def restore_models(repo: Path = REPO) -> list[str]:
    """Put back every model ``hold_models`` moved away; refuses to overwrite a folder that exists again."""
    held_dir = repo / HOLD
    back = []
    for folder in sorted((held_dir / "Resources" / "Models").glob("*")) if held_dir.exists() else []:
        rel = folder.relative_to(held_dir).as_posix()
        if (repo / rel).exists():
            sys.exit(f"{rel} exists again: not overwriting it; the held copy stays in {folder}")
        folder.rename(repo / rel)
        git(repo, "reset", "-q", "--", rel)
        back.append(rel)
    if held_dir.exists():
        shutil.rmtree(held_dir / "Resources", ignore_errors=True)  # empty folders only: every model was moved back
        held_dir.rmdir() if not any(held_dir.iterdir()) else None
    return back


def quantise(src: Path, dst: Path, percentiles: tuple[float, float] | None) -> None:
    img = nib.load(str(src))
    x = np.asanyarray(img.dataobj).astype(np.float32)
    lo, hi = np.percentile(x, percentiles) if percentiles else (float(x.min()), float(x.max()))
    q = np.clip(np.rint((x - lo) / max(hi - lo, 1e-6) * 254 + 1), 1, 255).astype(np.uint8)
    q[x == 0] = 0  # zeros stay zeros (skull-stripped background is 'no data' for the non-zero normalisations)
    header = img.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    nib.save(nib.Nifti1Image(q, None, header), str(dst))  # the header keeps qform/sform codes and pixdim


def pack_dataset(src: Path, dst: Path, percentiles: tuple[float, float] | None) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True)
    (dst / "labelsTr").mkdir()
    shutil.copy(src / "dataset.json", dst / "dataset.json")
    for p in sorted((src / "imagesTr").glob("*.nii*")):
        quantise(p, dst / "imagesTr" / p.name, percentiles)
    for p in sorted((src / "labelsTr").glob("*.nii*")):
        shutil.copy(p, dst / "labelsTr" / p.name)


def check(src: Path, dst: Path, task: str) -> float:
    """Largest difference after the preset's normalisation, original vs packed, on the first case."""
    import torch

    from DSDSegmentationLib.engine.data import list_cases
    from DSDSegmentationLib.engine.tasks import load_preset
    from DSDSegmentationLib.engine.transforms import LoadCased, NormalizeChannelsd

    preset = load_preset(task)
    a, b = list_cases(src, channels=preset.channels)[0], list_cases(dst, channels=preset.channels)[0]
    load, norm = LoadCased(preset=preset), NormalizeChannelsd(preset.normalization)
    xa = norm(load({"image": a.images}))["image"]
    xb = norm(load({"image": b.images}))["image"]
    assert torch.allclose(xa.affine, xb.affine), "the packed geometry differs"
    return float((xa - xb).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", choices=sorted(TASKS))
    ap.add_argument("--out", default=str(REPO / ".device"))
    ap.add_argument("--keep-models", action="store_true", help="do not hold back the other tasks' models")
    ap.add_argument("--include-model", action="append", default=[], metavar="PACKAGE",
                    help="a model package to take along as .device/models/<its folder name> (for gpu_session.py "
                         "--init-from, e.g. a wide network begun on a CPU, exported with --weights-dtype float16)")
    ap.add_argument("--restore", action="store_true", help="put back the models an earlier pack held back, and stop")
    args = ap.parse_args()
    if args.restore:
        print("restored:", ", ".join(restore_models()) or "nothing was held")
        return
    if not args.dataset:
        ap.error("--dataset is required (or --restore)")
    from DSDSegmentationLib.engine.data import find_shared_data
    from DSDSegmentationLib.engine.tasks import load_preset

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    wheels = out / "wheels"
    wheels.mkdir(parents=True)
    specs = [f"{n}=={md.version(n)}" for n in WHEELS]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
                    *specs], check=True)
    task = TASKS[args.dataset]
    norms = load_preset(task).normalization
    percentiles = None
    if all(n["kind"] == "percentile" for n in norms):
        percentiles = (min(n.get("lower", 0.5) for n in norms) / 2, (100 + max(n.get("upper", 99.5) for n in norms)) / 2)
    src = find_shared_data() / args.dataset
    pack_dataset(src, out / "data" / args.dataset, percentiles)
    for package in map(Path, args.include_model):
        if not (package / "model.json").is_file():
            sys.exit(f"--include-model {package}: not a model package (no model.json)")
        shutil.copytree(package, out / "models" / package.name)
        print(f"included {package} as {out / 'models' / package.name}")
    print(f"{args.dataset}: packed (range: {'percentiles %s' % (percentiles,) if percentiles else 'min to max'}); largest "
          f"difference after the '{task}' normalisation {check(src, out / 'data' / args.dataset, task):.4f} (z-score units)")
    carried = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    held = [] if args.keep_models else hold_models(task)
    if held:
        print(f"held back for the session (NOT deleted; `pack.py --restore` puts them back, do not commit meanwhile): "
              f"{', '.join(held)}")
    tree = tree_bytes()
    print(f"wheels: {', '.join(specs)}; .device {carried / 2**20:.1f} MiB + tree {tree / 2**20:.1f} MiB "
          f"= {(carried + tree) / 2**20:.1f} MiB (limit 64)")
    if carried + tree > LIMIT:
        restore_models()
        sys.exit("too large to travel even with the other tasks' models held back")
    (out / "manifest.json").write_text(json.dumps({"dataset": args.dataset, "task": task, "wheels": specs,
                                                   "held_models": held}, indent=1))


if __name__ == "__main__":
    main()
