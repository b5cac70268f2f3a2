"""Cine (4D) series: every frame of a time series segmented, the segments' volumes per frame, and the ventricles'
ejection fractions. Used by ``dsdseg predict --frames`` on a 4D file and by the Slicer module's 'All frames' on a
sequence (which counts its volumes on MRML segments and words its frames as Slicer shows them). numpy only at
import time: the module's Slicer-side bridge imports this without torch."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

# terminology type codes (SNOMED CT) of a ventricle's cavity: its largest and smallest volume give an ejection fraction
# (a myocardium segment carries the ventricle as its region, not as its type)
VENTRICLE_TYPES = {"53085002": "right ventricle", "87878005": "left ventricle"}


def label_volumes_ml(labels: np.ndarray, affine: np.ndarray, names: dict[int, str]) -> dict[str, float]:
    """Label name → volume in mL (voxel count × voxel volume from the affine) for every non-zero label value."""
    voxel_ml = abs(float(np.linalg.det(np.asarray(affine, float)[:3, :3]))) / 1000.0
    counts = np.bincount(labels.ravel().astype(np.int64), minlength=max(names) + 1)
    return {name: float(counts[value]) * voxel_ml for value, name in sorted(names.items()) if value}


def agreement_words(entry: dict[str, Any] | None, unit: str) -> str:
    """How an index of this model agreed with the manual reference on its validation patients (the card's
    ``validation.clinical_indices``, from ``Testing/Benchmarks/bench_cardiac_function.py``), in words; "" if unknown."""
    if not entry:
        return ""
    bias, sd = float(entry["bias"]), float(entry["sd"])
    lo, hi = entry.get("limits_of_agreement") or (bias - 1.96 * sd, bias + 1.96 * sd)
    return (f"; against the manual reference on this model's {int(entry['patients'])} validation patients: "
            f"{bias:+.1f} ± {sd:.1f} {unit} (95 % limits of agreement {float(lo):+.1f} to {float(hi):+.1f}), "
            f"r = {float(entry['r']):.2f}")


def ejection_fractions(frames: list[str], volumes: list[dict[str, float]], preset: dict[str, Any],
                       agreement: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """For each label whose terminology type is a ventricle (its cavity): the largest (end-diastolic) and smallest
    (end-systolic) volume over the frames and the ejection fraction (EDV - ESV) / EDV, in words; ``frames`` names each
    frame as the user reads it. Empty for other models or a single frame. Only true end-diastole and end-systole if a
    whole heart cycle is among the frames. ``agreement``: the model card's ``validation.clinical_indices`` — each EF
    then says how this model's EF agreed with the manual reference on its validation patients, so that a number
    the model gets wrong (the right ventricle's) is read with its error. The left ventricle's note is followed by its
    mass (:func:`left_ventricle_mass`)."""
    if len(frames) < 2:
        return []
    labels = {int(k): v for k, v in preset["labels"].items()}
    out = []
    for value, entry in sorted((preset.get("terminology") or {}).items(), key=lambda kv: int(kv[0])):
        code = (entry.get("type") or "^^").split("^")[1]
        name = labels.get(int(value))
        if code not in VENTRICLE_TYPES or entry.get("region") or name is None:
            continue
        series = [v.get(name, 0.0) for v in volumes]
        ed, es = int(np.argmax(series)), int(np.argmin(series))
        if series[ed] <= 0:
            continue
        ef = 100.0 * (series[ed] - series[es]) / series[ed]
        index = f"{VENTRICLE_TYPES[code]} ejection fraction"
        out.append(f"{index} {ef:.0f} % (largest {series[ed]:.1f} mL in {frames[ed]}, smallest {series[es]:.1f} mL in "
                   f"{frames[es]}{agreement_words((agreement or {}).get(index), 'points')})")
        if code == "87878005":  # the left ventricle: its myocardium's mass at end-diastole (the cavity's largest)
            out += left_ventricle_mass(frames, volumes, preset, ed, agreement)
    return out


MYOCARDIUM_DENSITY = 1.05  # g/mL, the convention of cardiac MRI analysis (as bench_cardiac_function.py measures it)


def left_ventricle_mass(frames: list[str], volumes: list[dict[str, float]], preset: dict[str, Any], ed: int,
                        agreement: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """The left-ventricular myocardium's mass (volume x 1.05 g/mL) in frame ``ed`` (end-diastole), in words, for a
    model with a myocardium segment whose region is the left ventricle; with the model's agreement with the manual
    reference where its card has it."""
    labels = {int(k): v for k, v in preset["labels"].items()}
    for value, entry in sorted((preset.get("terminology") or {}).items(), key=lambda kv: int(kv[0])):
        if (entry.get("type") or "^^").split("^")[1] == "74281007" and \
                (entry.get("region") or "^^").split("^")[1] == "87878005" and int(value) in labels:
            mass = volumes[ed].get(labels[int(value)], 0.0) * MYOCARDIUM_DENSITY
            return [f"left ventricle mass {mass:.0f} g (myocardium at 1.05 g/mL in {frames[ed]}"
                    f"{agreement_words((agreement or {}).get('left ventricle mass'), 'g')})"]
    return []


def write_volumes_csv(path: str | Path, frames: list[str], volumes: list[dict[str, float]], names: list[str]) -> Path:
    """One row per frame: the frame and each label's volume in mL (written atomically)."""
    from .outputs import apply_umask, write_error

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", newline="", encoding="utf-8", dir=path.parent, prefix=".tmp-",
                                         suffix=".csv", delete=False) as f:
            writer = csv.writer(f)
            writer.writerow(["frame"] + [f"{n} (mL)" for n in names])
            for frame, per_label in zip(frames, volumes):
                writer.writerow([frame] + [f"{per_label.get(n, 0.0):.2f}" for n in names])
        apply_umask(f.name)
        Path(f.name).replace(path)
    except OSError as e:
        raise write_error(path, e) from e
    return path


def predict_frames(predictor: Any, source: str | Path, output: str | Path,
                   volumes_csv: str | Path | None = None) -> tuple[Path, list[str]]:
    """Segment every frame of a 4D file (x, y, z, t) with a one-input model into a 4D labelmap on the same grid (the
    input's header kept), optionally with the volumes per frame as CSV. Returns the output and the notes (the
    ventricles' ejection fractions, the left ventricle's mass)."""
    from .io import load_volume, save_image, save_labelmap
    from .progress import only_stages

    preset = predictor.model.preset
    if len(preset.channels) != 1:
        raise InputError(f"--frames works with one-input models; this model needs {len(preset.channels)} inputs "
                         f"({', '.join(preset.channels)})")
    source = Path(source)
    data, affine = load_volume(source, f"input {source.name}")
    if data.ndim != 4 or data.shape[3] < 1:
        raise InputError(f"input {source.name} has shape {data.shape}; --frames needs a 4D series (x, y, z, frames)")
    if not str(output).endswith((".nii", ".nii.gz")):
        raise InputError(f"{output}: a 4D result is written as NIfTI; the name must end in .nii.gz or .nii")
    names = {int(k): v for k, v in preset.labels.items()}
    count = data.shape[3]
    frames = [f"frame {t + 1}" for t in range(count)]
    results, volumes = [], []
    with tempfile.TemporaryDirectory(prefix="dsdseg-frames-") as tmp, \
            only_stages(predictor, ("frames", "log")) as progress:  # one bar over the frames
        for t in range(count):
            predictor.check_stop()
            frame_file = save_image(np.ascontiguousarray(data[..., t]), affine, Path(tmp) / f"frame_{t:04d}.nii.gz")
            labels, _ = predictor.predict(str(frame_file))
            results.append(labels)
            volumes.append(label_volumes_ml(labels, affine, names))
            progress.update("frames", t + 1, count, f"frame {t + 1} of {count}")
    predictor.check_stop()
    out = save_labelmap(np.stack(results, axis=-1), affine, output, reference=source)
    if volumes_csv:
        write_volumes_csv(volumes_csv, frames, volumes, [n for v, n in sorted(names.items()) if v])
    return out, ejection_fractions(frames, volumes, preset.to_dict(),
                                   predictor.model.card.get("validation", {}).get("clinical_indices"))
