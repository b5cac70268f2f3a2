"""Reading what a model is (task preset, labels, colours, inputs) without torch: from a model package's
``model.json`` or a training run's ``config.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import InputError, read_json


def read_model_card(source: str | Path) -> dict[str, Any]:
    """The card of a model package folder, or the equivalent of a training run folder."""
    p = Path(source)
    if (p / "model.json").is_file():
        card = read_json(p / "model.json", what=f"model {p}: model.json")
    elif (p / "config.json").is_file() and ((p / "best.pt").is_file() or (p / "last.pt").is_file()):
        cfg = read_json(p / "config.json")
        resolved = cfg.get("resolved", {})
        card = {"preset": resolved.get("preset"), "network": resolved.get("network"), "dsd": resolved.get("dsd")}
    elif p.exists():
        raise InputError(f"{p} is not a model package (model.json) or a training run folder (config.json + checkpoint)")
    else:
        raise InputError(f"model {p} does not exist")
    preset = card.get("preset") or {}
    for key in ("labels", "channels"):
        if key not in preset:
            raise InputError(f"model {p}: its card has no preset '{key}'")
    return card


USER_MODELS_ENV = "DSDSEG_MODELS"


def resources_dir() -> Path:
    """The extension's ``Resources`` folder (top level of the source tree; mirrored next to the module in Slicer)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "Resources" / "Terminology").is_dir():  # always shipped, unlike the models
            return parent / "Resources"
    return here.parents[3] / "Resources"


def builtin_models_dir() -> Path:
    """``Resources/Models`` of the extension."""
    return resources_dir() / "Models"


def user_models_dir() -> Path:
    """Per-user model folder: ``$DSDSEG_MODELS`` or ``~/.DSDSegmentation/models``."""
    import os

    return Path(os.environ.get(USER_MODELS_ENV) or Path.home() / ".DSDSegmentation" / "models")


def list_models(folders: list[Path] | None = None) -> list[dict[str, Any]]:
    """Model packages found in the built-in and user folders, each with ``id``, ``path``, ``source``
    (builtin/user), ``title``, ``card`` and ``status`` (``ok`` or a readable problem: unreadable card, missing
    weights, sha256 mismatch). Problems are reported, never raised, so one bad package hides nothing else."""
    from .models_sha import sha256_of

    folders = folders if folders is not None else [builtin_models_dir(), user_models_dir()]
    found = []
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            continue
        for pkg in sorted(p for p in folder.iterdir() if p.is_dir()):
            entry: dict[str, Any] = {"id": pkg.name, "path": str(pkg), "source": "builtin" if i == 0 else "user",
                                     "title": pkg.name, "card": None, "status": "ok"}
            try:
                card = read_model_card(pkg)
                entry["card"] = card
                entry["title"] = card.get("title") or card["preset"].get("title") or pkg.name
                weights = pkg / card.get("weights", "weights.pt")
                if not weights.is_file():
                    entry["status"] = f"weights file {weights.name} is missing"
                elif card.get("sha256") and sha256_of(weights) != card["sha256"]:
                    entry["status"] = "weights file is corrupt (sha256 does not match the card)"
            except InputError as e:
                entry["status"] = str(e)
            found.append(entry)
    return found
