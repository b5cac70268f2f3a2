"""Fine-tuning a model on a user's annotated cases, and the per-user model store.

``finetune`` starts from a base model's backbone weights (fresh DSD heads), trains on the user's cases with at
least one held out for validation, evaluates the base and the result on the held-out cases (original grids), and
registers the result as a new versioned model package in the user store. The base model is never written to.
One fine-tune runs at a time per store (a lock file holding the owner's pid).

The store is a folder of model packages (``$DSDSEG_MODELS`` or ``~/.DSDSegmentation/models``); packages move in
and out as zip files with safe extraction (no absolute paths, no ``..``, no links) and a full sha256 check.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from .cards import PACKAGE_CARD, builtin_models_dir, read_model_card, user_models_dir, verify_package
from .data import list_cases, validate_case
from .errors import ConfigError, InputError
from .labelmapping import derive_mapping, is_identity, mapped_preset
from .labelmapping import describe as describe_mapping
from .outputs import apply_umask, check_writable_folder, write_error
from .progress import Progress

LOCK_NAME = ".finetune.lock"


@contextmanager
def finetune_lock(store: Path) -> Iterator[None]:
    """Exclusive per-store lock held by the operating system (``flock`` / ``msvcrt.locking``) on a lock file that
    holds the owner's pid for messages. The lock is released when its owner ends, however it ends, so a lock left
    by a killed run is free at once, and taking it is atomic: two starters can never both hold it."""
    store.mkdir(parents=True, exist_ok=True)
    lock = store / LOCK_NAME
    fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() if hasattr(os, "pread") else "?"
            except OSError:
                pid = "?"
            raise InputError(f"another fine-tune is running (process {pid or '?'}); stop it first or wait for it to end")
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0) if hasattr(os, "pwrite") else os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # closing releases the lock; the file stays (removing it would race with the next owner)


def next_model_id(store: Path, base_id: str, name: str | None = None) -> str:
    """``<name or base>-ft-<n>`` with the first free version number n (never an existing folder)."""
    stem = re.sub(r"[^a-z0-9._-]+", "-", (name or f"{base_id}-ft").lower()).strip("-") or "model"
    pattern = re.compile(rf"^{re.escape(stem)}-v(\d+)$")
    taken = [int(m.group(1)) for p in store.glob(f"{stem}-v*") if (m := pattern.match(p.name))]
    return f"{stem}-v{max(taken, default=0) + 1}"


def _evaluate(model_path: str | Path, cases: list, device: str, labels: dict[int, str],
              remap: dict[int, int] | None = None) -> dict[str, Any]:
    """Held-out metrics of a model; ``remap`` (base label value → user label value) scores a base model whose
    labels differ from the user's (a merge counts its parts as the whole; a new label is never predicted)."""
    import numpy as np

    from .inference import Predictor
    from .io import save_labelmap
    from .metrics import evaluate_files, summarize

    predictor = Predictor(model_path, device=device)
    with tempfile.TemporaryDirectory(prefix="dsdseg-ft-eval-") as tmp:
        pairs = []
        for c in cases:
            out = Path(tmp) / f"{c.id}.nii.gz"
            if remap is None:
                predictor.predict_to_file(c.images, out)
            else:
                pred, affine = predictor.predict(c.images)
                lut = np.zeros(int(max(pred.max(), max(remap))) + 1, dtype=np.uint16)
                for src, dst in remap.items():
                    lut[src] = dst
                save_labelmap(lut[pred], affine, out, reference=c.images[0])
            pairs.append((c.id, str(out), c.label))
        summary = summarize(evaluate_files(pairs, labels))
    per_class = {name: {"dice": s["dice"]["mean"], "hd95_mm": s["hd95"]["mean"]} for name, s in summary.items()}
    dices = [v["dice"] for v in per_class.values() if v["dice"] is not None]
    return {"per_class": per_class, "mean_dice": sum(dices) / len(dices) if dices else None, "cases": len(cases)}


# dsd "plain": fine-tuning with DSD gave the same Dice as without it in bench_finetune_cases.py (hippocampus, 2-10
# cases, label change and scanner shift, 3 seeds; README) at ~1.2x the step time, so the default is the cheaper one
FINETUNE_DEFAULTS = {"epochs": 30, "lr": 1e-3, "dsd": "plain", "val_every": 1, "val_fraction": 0.2, "seed": 0}
REGISTERED = "registered.json"


def finetune(base: str | Path, data: str | Path, output: str | Path, epochs: int | None = None, lr: float | None = None,
             dsd: str | None = None, freeze_encoder: bool = False, patience: int | None = None,
             val_fraction: float | None = None, seed: int | None = None, device: str = "auto",
             store: str | Path | None = None, name: str | None = None, resume: bool = False,
             max_steps_per_epoch: int | None = None, progress: Progress | None = None,
             val_every: int | None = None, label_map: dict[str, Any] | None = None,
             precision: str = "auto") -> dict[str, Any]:
    """Fine-tune ``base`` on the cases in ``data`` (run folder ``output``) and register the result in ``store``.

    Settings left as None take :data:`FINETUNE_DEFAULTS` for a new run and the run's own values on ``resume``
    (an explicit value that differs from the run's is an error). Resuming a run that already registered its
    model returns that model; nothing is registered twice.

    When the dataset's labels differ from the base model's (or ``label_map`` is given), each user label is mapped to
    a base label, a merge of several, or a new one (:mod:`labelmapping`); the mapping is logged before training
    and recorded in the new model's card."""
    from .models import export_package
    from .training import TrainConfig, Trainer

    progress = progress or Progress("none")
    out = Path(output)
    if resume and (out / REGISTERED).is_file():
        done = json.loads((out / REGISTERED).read_text(encoding="utf-8"))
        progress.log(f"this fine-tune already finished and registered {done['model_id']}; nothing to resume")
        return {**done, "already_registered": True}
    if resume and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        dsd = dsd or saved.get("dsd")
        seed = saved.get("seed") if seed is None else seed
        val_every = val_every or saved.get("resolved", {}).get("val_every")
        val_fraction = saved.get("val_fraction") if val_fraction is None else val_fraction
    else:
        epochs = epochs or FINETUNE_DEFAULTS["epochs"]
        lr = lr or FINETUNE_DEFAULTS["lr"]
    dsd = dsd or FINETUNE_DEFAULTS["dsd"]
    seed = FINETUNE_DEFAULTS["seed"] if seed is None else seed
    val_every = val_every or FINETUNE_DEFAULTS["val_every"]
    val_fraction = FINETUNE_DEFAULTS["val_fraction"] if val_fraction is None else val_fraction
    store = Path(store) if store else user_models_dir()
    base = Path(base)
    card = verify_package(base) if (base / PACKAGE_CARD).is_file() else read_model_card(base)
    base_preset, network = card["preset"], card["network"]
    base_labels = {int(k): v for k, v in base_preset["labels"].items()}
    if resume and (out / "config.json").is_file():
        saved = json.loads((out / "config.json").read_text(encoding="utf-8"))
        user_labels = {int(k): v for k, v in (saved.get("preset") or base_preset)["labels"].items()}
        label_map = saved.get("label_map_spec") if label_map is None else label_map
    else:
        from .data import dataset_labels

        user_labels = (dataset_labels(data) if Path(data).is_dir() else None) or base_labels
    mapping = derive_mapping(base_labels, user_labels, label_map)
    identity = is_identity(mapping, base_labels) and label_map is None
    new_terms = {int(k): v["terminology"] for k, v in (label_map or {}).items()
                 if isinstance(v, dict) and isinstance(v.get("terminology"), dict)}
    preset = base_preset if identity else mapped_preset(base_preset, mapping, new_terms)
    if not identity:
        network = {**network, "out_channels": len(mapping)}
        for line in describe_mapping(mapping, base_labels):
            progress.log(f"label mapping: {line}")  # shown before anything is trained (the panel shows these lines)
    labels = {int(k): v for k, v in preset["labels"].items()}
    if not resume:
        cases = list_cases(data)
        if len(cases) < 2:
            raise InputError(f"fine-tuning needs at least 2 annotated cases (one is held out for validation); {data} has "
                             f"{len(cases)}")
        seen: set[int] = set()
        for c in cases:
            if c.label is None:
                raise InputError(f"case {c.id} has no segmentation; every fine-tuning case needs one")
            seen |= set(validate_case(c, len(preset["channels"]), list(labels)).get("label_values", []))
        empty = [f"{v} {n}" for v, n in labels.items() if v and v not in seen]
        if empty:
            raise InputError(f"label(s) {', '.join(empty)} are empty in every case; annotate them in at least one case "
                             "or leave them out of the dataset's labels")
    with finetune_lock(store):
        cfg = TrainConfig(task=preset["name"], data=str(data), output=str(out), dsd=dsd, epochs=epochs, lr=lr,
                          val_every=val_every, val_fraction=val_fraction, seed=seed, device=device,
                          max_steps_per_epoch=max_steps_per_epoch, preset=preset, network=network,
                          init_from=str(base), freeze_encoder=freeze_encoder, patience=patience,
                          label_map=None if identity else [m.sources for m in mapping],
                          label_map_spec=label_map, precision=precision)
        t0 = time.time()
        trainer = Trainer(cfg, progress=progress, resume=resume)
        if not identity and not resume:
            trainer.first_log = [f"label mapping: {line}" for line in describe_mapping(mapping, base_labels)]
        result = trainer.fit()
        split = json.loads((out / "split.json").read_text(encoding="utf-8"))
        from .data import Case

        val = [Case(**c) for c in split["val"]]
        train = [Case(**c) for c in split["train"]]
        progress.log("evaluating the base model and the fine-tuned model on the held-out case(s)")
        remap = None if identity else {s: m.value for m in mapping for s in m.sources}
        before = _evaluate(base, val, device, labels, remap)
        after = _evaluate(out, val, device, labels)
        model_id = next_model_id(store, card.get("id") or base.name, name)
        history = json.loads((out / "history.json").read_text(encoding="utf-8"))
        extra = {
            "id": model_id, "version": model_id.rsplit("-v", 1)[-1],
            "title": f"{card.get('title') or preset.get('title') or base.name} — fine-tuned ({model_id})",
            "task": preset["name"], "inputs": list(preset["channels"]),
            "base_model": {"id": card.get("id") or base.name, "path": str(base), "sha256": card.get("sha256"),
                           "version": card.get("version")},
            "licence": card.get("licence") or {"id": "unknown", "non_commercial": True,
                                               "text": "licence of the base model and of your data"},
            "training_data": {"name": f"user cases from {data}", "licence": "the user's own data",
                              "train_cases": len(train), "val_cases": len(val)},
            "split": {"seed": seed, "by": "patient", "val_ids": [c.id for c in val], "train_ids": [c.id for c in train]},
            "training": {"epochs": len(history), "seed": seed, "dsd": dsd, "lr": trainer.lr,
                         "planned_epochs": trainer.epochs, "freeze_encoder": trainer.cfg.freeze_encoder,
                         "patience": trainer.cfg.patience, "stopped_early": result.get("stopped_early", False),
                         "wall_time_minutes": round((time.time() - t0) / 60, 2), "hardware": device},
            "validation": {"cases": len(val), "per_class": after["per_class"], "mean_dice": after["mean_dice"],
                           "base_model": before},
            "label_mapping": None if identity else [
                {"value": m.value, "name": m.name, "kind": m.kind, "decided_by": m.by,
                 "from": [{"value": s_, "name": base_labels[s_]} for s_ in m.sources]} for m in mapping[1:]],
            "versions": _versions(),
        }
        package = export_package(out, store / model_id, extra)
        done = {"model_id": model_id, "package": str(package), "before": before, "after": after, "run": str(out),
                "stopped_early": result.get("stopped_early", False)}
        from .outputs import atomic_write_text

        atomic_write_text(out / REGISTERED, json.dumps(done, indent=2))
    progress.log(f"registered {model_id} in {store}: held-out Dice {before['mean_dice']:.4f} (base) -> "
                 f"{after['mean_dice']:.4f} (fine-tuned)")
    return done


def _versions() -> dict[str, str]:
    import platform

    import monai
    import numpy
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "monai": monai.__version__,
            "numpy": numpy.__version__}


# --------------------------------------------------------------------------------------------- zip in / out
def export_zip(package: str | Path, zip_path: str | Path) -> Path:
    """Write a verified model package as a zip (files at the top level of a folder named like the package)."""
    package = Path(package)
    zip_path = Path(zip_path)
    if not zip_path.name.lower().endswith(".zip"):
        raise InputError(f"{zip_path}: the file name must end in .zip")
    if zip_path.exists():
        raise InputError(f"{zip_path} already exists; choose another file name")
    verify_package(package)
    check_writable_folder(zip_path.parent if str(zip_path.parent) else Path("."), "models export")
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".zip", dir=zip_path.parent if str(zip_path.parent) else ".")
    os.close(fd)
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
            for f in sorted(package.iterdir()):
                if f.is_file():
                    z.write(f, f"{package.name}/{f.name}")
        apply_umask(tmp)
        os.link(tmp, zip_path)  # atomic and never replaces a file that appeared meanwhile
    except FileExistsError as e:
        raise InputError(f"{zip_path} already exists; choose another file name") from e
    except OSError as e:
        if isinstance(e, InputError):
            raise
        raise write_error(zip_path, e) from e
    finally:
        os.remove(tmp)
    return zip_path


def import_zip(zip_path: str | Path, store: str | Path | None = None) -> Path:
    """Safely extract a model package zip into the store; the sha256 of every file is checked before it appears
    there, and an existing model is never overwritten."""
    store = Path(store) if store else user_models_dir()
    zip_path = Path(zip_path)
    if not zipfile.is_zipfile(zip_path):
        raise InputError(f"{zip_path} is not a zip file")
    store.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(zip_path) as z:
        members = z.infolist()
        tops = set()
        for m in members:
            name = m.filename
            parts = Path(name).parts
            if name.startswith(("/", "\\")) or ".." in parts or ":" in name or "\\" in name:
                raise InputError(f"{zip_path}: refusing '{name}', a path outside the package")
            if (m.external_attr >> 16) & 0o170000 == 0o120000:
                raise InputError(f"{zip_path}: refusing '{name}', a symbolic link")
            if len(parts) != 2 and not m.is_dir():
                raise InputError(f"{zip_path}: '{name}' is not a file directly inside one package folder")
            tops.add(parts[0])
        if len(tops) != 1:
            raise InputError(f"{zip_path}: expected one package folder, found {sorted(tops)}")
        model_id = tops.pop()
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", model_id):
            raise InputError(f"{zip_path}: '{model_id}' is not a valid model id")
        target = store / model_id
        if target.exists():
            raise InputError(f"a model '{model_id}' already exists in {store}; remove or rename it first")
        if (builtin_models_dir() / model_id).is_dir():
            raise InputError(f"{zip_path}: '{model_id}' is a built-in model of this extension and already in the model "
                             "list; nothing was imported")
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-import-", dir=store))
        try:
            for m in members:
                if m.is_dir():
                    continue
                dest = tmp / Path(m.filename).name
                with z.open(m) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            verify_package(tmp)
            card = read_model_card(tmp)
            if card.get("id") and card["id"] != model_id:
                raise InputError(f"{zip_path}: the folder '{model_id}' does not match the card's id '{card['id']}'")
            for f in (tmp, *tmp.iterdir()):
                apply_umask(f)
            try:
                os.rename(tmp, target)  # fails if the target appeared meanwhile (another import): never merged
            except OSError as e:
                if target.exists():
                    raise InputError(f"a model '{model_id}' already exists in {store} (imported at the same time by "
                                     "another process); nothing was changed") from e
                raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
    return target


def check_store_model(model_id: str, store: str | Path | None = None) -> Path:
    store = Path(store) if store else user_models_dir()
    path = store / model_id
    if not path.is_dir():
        known = sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")) if store.is_dir() else []
        raise ConfigError(f"no model '{model_id}' in {store}; known: {', '.join(known) or 'none'}")
    return path
