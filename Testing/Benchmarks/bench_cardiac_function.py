#!/usr/bin/env python
"""What a cardiac model gives a researcher in clinical indices: end-diastolic and end-systolic volumes, ejection
fractions and left-ventricular mass, model against the manual reference, per validation patient.

Usage:  .venv/bin/python Testing/Benchmarks/bench_cardiac_function.py [--model Resources/Models/cardiac-dsd]
                                                                       [--json results.json]
The JSON's ``clinical_indices`` (bias, SD, r per index) is what a card's ``validation.clinical_indices`` holds
(``package_model.py --from-package ... --clinical-indices results.json``): the panel and ``dsdseg predict --frames``
then give each ejection fraction with this model's agreement with the reference.

The model card's validation patients (ACDC: the ED and the ES frame of each, frames named in the patient's Info.cfg)
from ../shared/data, predicted on their original grids with the true spacing (the loader's unit-sform rule). Volumes
are voxel counts x voxel volume (the same code as ``dsdseg predict --frames`` and the panel's 'All frames': Slicer
counts a segment's voxels the same way); LV mass = myocardium volume at ED x 1.05 g/mL. Printed per index: the
reference's and the model's mean, the bias (model - reference) with its standard deviation and 95 % limits of
agreement (Bland-Altman), the mean absolute difference and Pearson's r; then each patient's EF, and how much of the
model's end-systolic RV lies in slices where the reference has no RV (above the valve, below the apex). Ten
patients: read the limits as indicative.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import numpy as np

from DSDSegmentationLib.engine.cine import MYOCARDIUM_DENSITY, label_volumes_ml
from DSDSegmentationLib.engine.data import find_shared_data, list_cases
from DSDSegmentationLib.engine.inference import Predictor
from DSDSegmentationLib.engine.io import load_volume

REPO = Path(__file__).resolve().parents[2]
# (table row, key, card name: the words ``engine/cine.py`` uses for the index)
INDICES = (("LV EDV (mL)", "lv ed", "left ventricle end-diastolic volume"),
           ("LV ESV (mL)", "lv es", "left ventricle end-systolic volume"),
           ("LV EF (%)", "lv ef", "left ventricle ejection fraction"),
           ("RV EDV (mL)", "rv ed", "right ventricle end-diastolic volume"),
           ("RV ESV (mL)", "rv es", "right ventricle end-systolic volume"),
           ("RV EF (%)", "rv ef", "right ventricle ejection fraction"),
           ("LV mass (g)", "myo mass", "left ventricle mass"))


def info(folder: Path, patient: str) -> dict[str, str]:
    """The patient's Info.cfg (ED, ES, Group, ...) as strings."""
    text = (folder / "info" / f"{patient}_Info.cfg").read_text(encoding="utf-8")
    return dict(re.findall(r"^(\w+):\s*(.+?)\s*$", text, flags=re.M))


def indices(ed: dict[str, float], es: dict[str, float], names: dict[str, str]) -> dict[str, float]:
    """EDV, ESV, EF of each ventricle and the LV mass from the ED and ES volumes (mL) per label name."""
    out: dict[str, float] = {}
    for key in ("lv", "rv"):
        edv, esv = ed[names[key]], es[names[key]]
        out[f"{key} ed"], out[f"{key} es"] = edv, esv
        out[f"{key} ef"] = 100.0 * (edv - esv) / edv if edv > 0 else float("nan")
    out["myo mass"] = ed[names["myo"]] * MYOCARDIUM_DENSITY
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "Resources" / "Models" / "cardiac-dsd"))
    ap.add_argument("--json", type=Path, help="also write every patient's indices here (a new file)")
    args = ap.parse_args()
    card = json.loads((Path(args.model) / "model.json").read_text(encoding="utf-8"))
    labels = {int(k): v for k, v in card["preset"]["labels"].items() if int(k)}
    by_type = {"53085002": "rv", "87878005": "lv"}
    names: dict[str, str] = {}
    for value, entry in (card["preset"].get("terminology") or {}).items():
        code = (entry.get("type") or "^^").split("^")[1]
        key = "myo" if entry.get("region") else by_type.get(code)
        if key:
            names[key] = labels[int(value)]
    if sorted(names) != ["lv", "myo", "rv"]:
        raise SystemExit(f"{args.model}: not a model of both ventricles' cavities and the LV myocardium")
    folder = find_shared_data() / "ACDC_subset"
    val = set(card["split"]["val_ids"])
    cases = {c.id: c for c in list_cases(folder) if c.id in val}
    patients = sorted({cid.split("_")[0] for cid in cases})
    predictor = Predictor(args.model, device="cpu")
    rv_value = {v: k for k, v in labels.items()}[names["rv"]]
    rows = []
    for patient in patients:
        cfg = info(folder, patient)
        volumes, beyond = {}, {}
        for phase in ("ED", "ES"):
            case = cases.get(f"{patient}_frame{int(cfg[phase]):02d}")
            if case is None:
                raise SystemExit(f"{patient}: the {phase} frame {cfg[phase]} is not among the card's validation cases")
            pred, affine = predictor.predict(case.images)
            ref, ref_affine = load_volume(case.label, "label")
            if not np.allclose(affine, ref_affine, atol=1e-4):
                raise SystemExit(f"{case.id}: image and label geometry differ")
            ref = np.rint(ref).astype(np.int64)
            volumes[phase] = (label_volumes_ml(pred, affine, labels), label_volumes_ml(ref, ref_affine, labels))
            # where the RV error lies: the model's RV in slices (the last axis: ACDC's short-axis stack) in which the
            # reference has none (a basal slice above the valve, an apical one)
            empty = ~np.any(ref == rv_value, axis=(0, 1))
            beyond[phase] = label_volumes_ml(np.where(empty, pred, 0), affine, {rv_value: names["rv"]})[names["rv"]]
        rows.append({"patient": patient, "group": cfg.get("Group", "?"),
                     "model": indices(volumes["ED"][0], volumes["ES"][0], names),
                     "reference": indices(volumes["ED"][1], volumes["ES"][1], names),
                     "rv_in_slices_without_reference_rv_ml": beyond})
        print(f"{patient} ({rows[-1]['group']}): LV EF {rows[-1]['model']['lv ef']:.1f} (ref "
              f"{rows[-1]['reference']['lv ef']:.1f}), RV EF {rows[-1]['model']['rv ef']:.1f} (ref "
              f"{rows[-1]['reference']['rv ef']:.1f})", flush=True)

    print(f"\n# {card['id']} {card.get('version', '')}: clinical indices on {len(rows)} validation patients "
          "(ED and ES frames), model vs manual reference")
    print("| index | reference mean | model mean | bias (model − ref) ± SD | 95 % limits of agreement | "
          "mean abs. difference | Pearson r |")
    print("|---|---:|---:|---:|---|---:|---:|")
    agreement = {}
    for title, k, card_name in INDICES:
        m = np.array([r["model"][k] for r in rows])
        r_ = np.array([r["reference"][k] for r in rows])
        d = m - r_
        sd = float(np.std(d, ddof=1))
        r = float(np.corrcoef(m, r_)[0, 1])
        agreement[card_name] = {"bias": round(float(d.mean()), 3), "sd": round(sd, 3), "r": round(r, 3),
                                "limits_of_agreement": [round(float(d.mean()) - 1.96 * sd, 3),
                                                        round(float(d.mean()) + 1.96 * sd, 3)],
                                "mean_abs": round(float(np.abs(d).mean()), 3), "reference_mean": round(float(r_.mean()), 3),
                                "patients": len(rows)}
        print(f"| {title} | {r_.mean():.1f} | {m.mean():.1f} | {d.mean():+.1f} ± {sd:.1f} | "
              f"{d.mean() - 1.96 * sd:+.1f} to {d.mean() + 1.96 * sd:+.1f} | {np.abs(d).mean():.1f} | {r:.3f} |")
    print("\n| patient | group | LV EF ref / model | RV EF ref / model | RV ESV ref / model (mL) | model's ES RV in "
          "slices without reference RV (mL) |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        m, r_ = row["model"], row["reference"]
        print(f"| {row['patient']} | {row['group']} | {r_['lv ef']:.1f} / {m['lv ef']:.1f} | {r_['rv ef']:.1f} / "
              f"{m['rv ef']:.1f} | {r_['rv es']:.1f} / {m['rv es']:.1f} | "
              f"{row['rv_in_slices_without_reference_rv_ml']['ES']:.1f} |")
    extra = np.array([r["rv_in_slices_without_reference_rv_ml"]["ES"] for r in rows])
    error = np.array([r["model"]["rv es"] - r["reference"]["rv es"] for r in rows])
    print(f"\nRV ESV: model − reference {error.sum():+.1f} mL over the patients, of which {extra.sum():.1f} mL lie in "
          "slices where the reference has no right ventricle")
    if args.json:
        with open(args.json, "x", encoding="utf-8") as f:  # never replaces an earlier result
            json.dump({"model": card["id"], "version": card.get("version"), "patients": rows,
                       "clinical_indices": agreement}, f, indent=1)


if __name__ == "__main__":
    main()
