#!/usr/bin/env python
"""Turn a finished training run into a shipped model package with a complete card.

Usage:  .venv/bin/python Testing/Benchmarks/package_model.py --run output/bench_hippocampus/dsd_seed0 \
            --id hippocampus-dsd --output Resources/Models/hippocampus-dsd [--replace]

Evaluates the run's best checkpoint on its own validation split (Dice, HD95, ASSD per class on each case's original
grid, CPU seconds per case), then writes the package (head-free weights, model.json, SHA256SUMS) with: labels,
colours, terminology and interactive region (from the current built-in preset of the task), inputs, preprocessing, backbone and DSD
settings, training data and its licence, split, seed, epochs, wall time, package versions and the metrics.

An ensemble (probabilities of several trainings averaged, e.g. two seeds or arms of the same network and split):
add --ensemble-with RUN2 [RUN3 ...]; the card lists each member's run, DSD settings, epochs and wall time.
A new version from a new run: add --previous Resources/Models/<id> --version X (history carried on, change recorded).
A new version of a shipped package whose weights stay and whose preprocessing changes (re-measured the same way):
        ... package_model.py --from-package Resources/Models/hippocampus-dsd --set 'spacing=[1,1,1]' \
            --version 1.1.0 --output /tmp/new --note "why"      (then replace the package folder with /tmp/new)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import monai
import numpy
import torch

from DSDSegmentationLib.engine.cards import read_model_card
from DSDSegmentationLib.engine.data import Case, find_shared_data, list_cases
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.metrics import evaluate_files, summarize
from DSDSegmentationLib.engine.models import export_package
from DSDSegmentationLib.engine.sequence_check import template_from_cases
from DSDSegmentationLib.engine.tasks import TaskPreset, load_preset

DATA: dict = {
    "hippocampus": {
        "name": "Medical Segmentation Decathlon Task04 Hippocampus (Vanderbilt, 3D T1 MRI crops)",
        "url": "http://medicaldecathlon.com/", "licence": "CC-BY-SA-4.0",
        "model_licence": {"id": "CC-BY-SA-4.0", "non_commercial": False,
                          "text": "Trained on CC-BY-SA 4.0 data; the weights are shared under CC-BY-SA 4.0."}},
    "cardiac": {
        "name": "ACDC (Automated Cardiac Diagnosis Challenge, MICCAI 2017), 50-patient subset, ED and ES frames",
        "url": "https://www.creatis.insa-lyon.fr/Challenge/acdc/", "licence": "CC-BY-NC-SA-4.0",
        "model_licence": {"id": "CC-BY-NC-SA-4.0", "non_commercial": True,
                          "text": "Trained on ACDC (CC BY-NC-SA 4.0): non-commercial use only, share alike."}},
    "brain_tumour": {
        "name": "BraTS 2018 training cases at 2 mm (32 of 42 redistributed cases; FLAIR, T1, T1c, T2)",
        "url": "https://www.med.upenn.edu/sbia/brats2018.html", "licence": "research-non-commercial",
        "citations": ["Menze et al., IEEE TMI 34(10), 2015", "Bakas et al., Nature Scientific Data 4:170117, 2017",
                      "Bakas et al., arXiv:1811.02629, 2018"],
        "model_licence": {"id": "research-non-commercial", "non_commercial": True,
                          "text": "Trained on BraTS 2018 data released for research: research and non-commercial use "
                                  "only; cite the BraTS papers."}},
    "brain_tumour_2015": {
        "name": "BRATS 2013/2015 glioma sample (6 cases, FLAIR + T1c) from DeepMedic's examples",
        "url": "https://github.com/deepmedic/deepmedic", "licence": "CC-BY-NC-SA-3.0",
        "model_licence": {"id": "CC-BY-NC-SA-3.0", "non_commercial": True,
                          "text": "Trained on BRATS data (CC BY-NC-SA 3.0): non-commercial use only, share alike. "
                                  "Only 5 training cases: a demonstration model, not for research conclusions."}},
}


DATA["brain_tumour_2seq"] = {**DATA["brain_tumour"], "name": DATA["brain_tumour"]["name"] + "; FLAIR and T1c only"}
FOLDERS = {"hippocampus": "Task04_Hippocampus", "cardiac": "ACDC_subset", "brain_tumour": "BraTS2018_2mm",
           "brain_tumour_2seq": "BraTS2018_2mm", "brain_tumour_2015": "BraTS2015_DeepMedicSample"}
PRESET_KEYS = ("spacing", "normalization", "orientation", "crop_foreground", "inference")  # what --set may change


def _r(v, digits: int):
    return None if v is None else round(v, digits)


def run_hardware(cfg: dict) -> str:
    """The hardware a run trained on: recorded in its config since session 7; older runs trained on this project's
    CPU machines unless their device was CUDA."""
    recorded = cfg.get("resolved", {}).get("hardware")
    if recorded:
        return recorded
    if str(cfg.get("device", "")).startswith("cuda"):
        return "a CUDA GPU (model not recorded)"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), no GPU"


def precision_spans(history: list[dict]) -> str:
    """The training arithmetic by epoch range, e.g. "fp32 (epochs 1-82), bf16 autocast (epochs 83-150)"; epochs
    from before the setting was recorded ran in fp32 on the CPU."""
    spans: list[list] = []
    for h in history:
        p = h.get("precision", "fp32")
        if spans and spans[-1][0] == p:
            spans[-1][2] = h["epoch"]
        else:
            spans.append([p, h["epoch"], h["epoch"]])
    name = {"bf16": "bf16 autocast", "fp16": "fp16 autocast"}
    return ", ".join(f"{name.get(p, p)} (epochs {a}-{b})" for p, a, b in spans)


def run_summary(cfg: dict, history: list[dict]) -> dict:
    """How a training run was made, for the card: epochs, seed, DSD terms, learning rate, wall time, precision,
    hardware and its best preprocessed validation Dice."""
    return {"epochs": len(history), "seed": cfg["seed"], "dsd": cfg["dsd"], "lr": cfg["resolved"]["lr"],
            "wall_time_minutes": round(sum(h["seconds"] for h in history) / 60, 1),
            "precision": precision_spans(history), "hardware": run_hardware(cfg),
            "best_val_dice_preprocessed": max(h.get("val_dice", 0) for h in history)}


def regions_for(model_preset, preset) -> dict[str, list[int]]:
    """The task's current evaluation regions (a run started before they existed records none) whose label values
    the model has."""
    values = set(model_preset.label_values)
    return {k: v for k, v in (preset.regions or model_preset.regions or {}).items() if set(v) <= values}


def evaluate(predictor: Predictor, val: list[Case], preset) -> tuple[dict, list[float]]:
    """Dice, HD95, ASSD per class and region on each validation case's original grid, and CPU seconds per case."""
    secs = []
    with tempfile.TemporaryDirectory() as tmp:
        pairs = []
        for c in val:
            out = Path(tmp) / f"{c.id}.nii.gz"
            t0 = time.perf_counter()
            predictor.predict_to_file(c.images, out)
            secs.append(time.perf_counter() - t0)
            pairs.append((c.id, str(out), c.label))
        regions = regions_for(predictor.model.preset, preset)
        metrics = summarize(evaluate_files(pairs, predictor.model.preset.labels, regions))
    classes = [n for v, n in sorted(preset.labels.items()) if v] + list(regions)
    validation = {
        "cases": len(val), "grid": "each case's original grid", "checkpoint": "best validation Dice",
        "per_class": {n: {"dice": round(metrics[n]["dice"]["mean"], 4), "dice_std": round(metrics[n]["dice"]["std"], 4),
                          "hd95_mm": _r(metrics[n]["hd95"]["mean"], 3), "assd_mm": _r(metrics[n]["assd"]["mean"], 3),
                          "undefined_distance": metrics[n]["undefined_distance"]}
                      for n in classes},
    }
    validation["mean_dice"] = round(statistics.mean(validation["per_class"][n]["dice"] for n in classes
                                                    if n not in regions), 4)
    return validation, secs


def from_package(args) -> None:
    """Same weights, new preprocessing (``--set key=json``): re-measured on the card's own validation cases."""
    src = Path(args.from_package)
    card = read_model_card(src)
    changes = {}
    for item in args.set or []:
        key, _, value = item.partition("=")
        if key not in PRESET_KEYS:
            raise SystemExit(f"--set {key}: only {PRESET_KEYS} may change without retraining")
        changes[key] = json.loads(value)
    preset_dict = {**card["preset"], **changes}
    if args.clinical_indices:
        measured = json.loads(args.clinical_indices.read_text(encoding="utf-8"))
        if (measured.get("model"), measured.get("version")) != (card["id"], card.get("version")):
            raise SystemExit(f"{args.clinical_indices} was measured on {measured.get('model')} "
                             f"{measured.get('version')}, not on {card['id']} {card.get('version')}")
        added = {"validation.clinical_indices": f"{args.clinical_indices.name} (bench_cardiac_function.py)"}
    else:
        added = {}
    task = card["task"]
    ids = set(card["split"]["val_ids"])
    folder = find_shared_data() / FOLDERS[task]
    val = [c for c in list_cases(folder, channels=card["preset"]["channels"]) if c.id in ids]
    if len(val) != len(ids):
        raise SystemExit(f"found {len(val)} of the card's {len(ids)} validation cases in {folder}")
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp) / "staged"
        export_package(src, staged, {"preset": preset_dict}, weights_dtype=card.get("weights_dtype", "float32"))
        validation, secs = evaluate(Predictor(staged, device="cpu"), val, load_preset(task))
    if added:
        validation["clinical_indices"] = measured["clinical_indices"]
    history = list(card.get("history_of_versions", []))
    history.append({"version": card.get("version"), "validation_mean_dice": card.get("validation", {}).get("mean_dice")})
    extra = {"preset": preset_dict, "version": args.version, "validation": validation,
             "expected_seconds": {**card.get("expected_seconds", {}), "cpu": round(statistics.median(secs), 3),
                                  "cpu_note": f"median per validation case, {torch.get_num_threads()} torch thread(s) "
                                              f"on a {os.cpu_count()}-core CPU" + (f"; {args.note}" if args.note else "")},
             "changes": {"from_version": card.get("version"), "preset": changes, "weights": "unchanged",
                         "note": args.note, **({"card": added} if added else {})},
             "history_of_versions": history,
             "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                          "numpy": numpy.__version__}}
    out = Path(args.output)
    if out.exists():
        raise SystemExit(f"{out} exists; choose a new folder")
    export_package(src, out, extra, weights_dtype=card.get("weights_dtype", "float32"))
    print(json.dumps({"package": str(out), "changes": changes, "validation": validation,
                      "expected_seconds": extra["expected_seconds"]}, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="training run folder (config.json, best.pt, history.json, split.json)")
    ap.add_argument("--from-package", help="a package to re-issue with new preprocessing (see --set)")
    ap.add_argument("--set", action="append", help="with --from-package: preset key=json value, e.g. 'spacing=[1,1,1]'")
    ap.add_argument("--clinical-indices", type=Path, help="with --from-package: bench_cardiac_function.py's --json "
                    "for this model; its agreement with the reference goes into the card's validation")
    ap.add_argument("--id", help="model id, e.g. hippocampus-dsd (with --run)")
    ap.add_argument("--output", required=True)
    ap.add_argument("--version", default="1.0.0")
    ap.add_argument("--replace", action="store_true", help="replace an existing package at --output")
    ap.add_argument("--note", default="", help="how the run was made (e.g. CPU shared with other runs), kept in the card")
    ap.add_argument("--weights-dtype", choices=["float32", "float16"], default="float32",
                    help="float16: half the package size; the validation is measured with the stored weights")
    ap.add_argument("--ensemble-with", nargs="+", default=[], metavar="RUN",
                    help="with --run: further runs (or shipped packages) of the same network family, inputs, "
                         "preprocessing and split whose best checkpoints join as ensemble members (probabilities "
                         "averaged at inference; a member may be of another width)")
    ap.add_argument("--previous", help="with --run: the package this one succeeds (its version history is carried on "
                                       "and the change recorded: retrained weights)")
    args = ap.parse_args()
    if args.from_package:
        return from_package(args)
    if not (args.run and args.id):
        raise SystemExit("give --run and --id (a new package from a run) or --from-package")
    run = Path(args.run)
    cfg = json.loads((run / "config.json").read_text())
    history = json.loads((run / "history.json").read_text())
    split = json.loads((run / "split.json").read_text())
    task = cfg["resolved"]["preset"]["name"]
    preset = load_preset(task)  # current labels, colours and terminology of the task
    val = [Case(**c) for c in split["val"]]

    members = []  # the other runs of an ensemble: same validation cases, summarised like the main run
    for other in map(Path, args.ensemble_with):
        if (other / "model.json").is_file():  # a shipped package (its run folder may be gone): its card says it all
            other_card = read_model_card(other)
            if set(other_card.get("split", {}).get("val_ids", [])) != {c.id for c in val}:
                raise SystemExit(f"--ensemble-with {other}: its validation cases differ from {run}'s")
            members.append({"package": f"{other_card.get('id')} {other_card.get('version')}",
                            **{k: v for k, v in (other_card.get("training") or {}).items() if k != "note"}})
            continue
        if [c["id"] for c in json.loads((other / "split.json").read_text())["val"]] != [c.id for c in val]:
            raise SystemExit(f"--ensemble-with {other}: its validation cases differ from {run}'s")
        members.append({"run": other.name, **run_summary(json.loads((other / "config.json").read_text()),
                                                         json.loads((other / "history.json").read_text()))})

    # what inference does comes from the task's current preset too: interactive region, post-processing
    card_preset = {**cfg["resolved"]["preset"], "label_colors": {str(k): v for k, v in preset.label_colors.items()},
                   "terminology": {str(k): v for k, v in preset.terminology.items()}, "title": preset.title,
                   "roi": preset.roi, "regions": regions_for(TaskPreset.from_dict(cfg["resolved"]["preset"]), preset),
                   "postprocessing": preset.postprocessing}
    with tempfile.TemporaryDirectory() as tmp:  # measured with the weights as stored (float16 rounds them)
        staged = Path(tmp) / "staged"
        export_package(run, staged, {"preset": card_preset}, weights_dtype=args.weights_dtype, members=args.ensemble_with)
        validation, secs = evaluate(Predictor(staged, device="cpu"), val, preset)
    extra = {
        "id": args.id, "version": args.version, "title": preset.title, "task": task,
        "inputs": list(preset.channels),
        "preset": card_preset,
        "licence": DATA[task]["model_licence"],
        "training_data": {k: DATA[task][k] for k in ("name", "url", "licence", "citations") if k in DATA[task]} | {
            "train_cases": len(split["train"]), "val_cases": len(val)},
        "split": {"seed": split["seed"], "val_fraction": split["val_fraction"], "by": "patient",
                  "val_ids": [c.id for c in val]},
        "training": {**run_summary(cfg, history), "batch_size": cfg["resolved"]["batch_size"],
                     "samples_per_volume": cfg["resolved"]["samples_per_volume"], "note": args.note},
        "validation": validation,
        "expected_seconds": {"cpu": round(statistics.median(secs), 3),
                             "cpu_note": f"median per validation case, {torch.get_num_threads()} torch thread(s) on a "
                                         f"{os.cpu_count()}-core CPU (measured while packaging)",
                             "gpu": None},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
                     "numpy": numpy.__version__},
    }
    if members:
        extra["training"]["ensemble_members"] = members
    if len(preset.channels) > 1:  # the sequence-order check's template, from the training cases
        template, measured = template_from_cases([c["images"] for c in split["train"]], list(preset.channels))
        print(f"sequence-order check (leave-one-out on {measured['cases']} training cases): {measured}"
              + ("" if template else " -> too weak, not stored"))
        if template:
            extra["input_check"] = template
    if args.previous:
        prev = read_model_card(Path(args.previous))
        if prev.get("task") != task:
            raise SystemExit(f"--previous {args.previous} is a {prev.get('task')} model, this run is {task}")
        same_val = set(prev.get("split", {}).get("val_ids", [])) == {c.id for c in val}
        extra["history_of_versions"] = list(prev.get("history_of_versions", [])) + [
            {"version": prev.get("version"), "validation_mean_dice": prev.get("validation", {}).get("mean_dice")}]
        weights = f"ensemble of {1 + len(args.ensemble_with)} trainings" if args.ensemble_with else "retrained"
        extra["changes"] = {"from_version": prev.get("version"), "weights": weights, "note": args.note,
                            "same_validation_cases": same_val}
    out = Path(args.output)
    if out.exists():
        if not args.replace:
            raise SystemExit(f"{out} exists; pass --replace to overwrite it")
        shutil.rmtree(out)
    export_package(run, out, extra, weights_dtype=args.weights_dtype, members=args.ensemble_with)
    print(json.dumps({"package": str(out), "validation": validation, "expected_seconds": extra["expected_seconds"]}, indent=2))


if __name__ == "__main__":
    main()
