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


PACKAGE_CARD = "model.json"
PACKAGE_SUMS = "SHA256SUMS"


def write_checksums(folder: Path, files: list[str]) -> None:
    """``SHA256SUMS`` in ``sha256sum`` format (checkable with ``sha256sum -c``) for the package's files."""
    from .models_sha import sha256_of

    lines = [f"{sha256_of(folder / name)}  {name}\n" for name in files]
    (folder / PACKAGE_SUMS).write_text("".join(lines), encoding="utf-8")


def verify_package(folder: str | Path) -> dict[str, Any]:
    """Check a model package before anything in it is used; returns its card.

    The package must hold ``model.json``, its weights file(s) (one per member of an ensemble) and ``SHA256SUMS``
    listing them; every listed file must match its sha256 and the card's ``sha256`` values must be the weights'
    hashes. Anything else is refused with
    an error that names the file and the problem (corrupt, modified, missing)."""
    from .models_sha import sha256_of

    folder = Path(folder)
    sums_path = folder / PACKAGE_SUMS
    if not sums_path.is_file():
        raise InputError(f"model package {folder}: {PACKAGE_SUMS} is missing, so its files cannot be verified")
    listed: dict[str, str] = {}
    for n, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.strip().split(None, 1)
        if not parts:
            continue
        if len(parts) != 2 or len(parts[0]) != 64:
            raise InputError(f"model package {folder}: {PACKAGE_SUMS} line {n} is not '<sha256>  <file>'")
        name = parts[1].lstrip("*")
        if "/" in name or "\\" in name or name.startswith("."):
            raise InputError(f"model package {folder}: {PACKAGE_SUMS} names a file outside the package: {name}")
        listed[name] = parts[0].lower()
    if PACKAGE_CARD not in listed:
        raise InputError(f"model package {folder}: {PACKAGE_SUMS} does not list {PACKAGE_CARD}")
    for name, expected in listed.items():
        path = folder / name
        if not path.is_file():
            raise InputError(f"model package {folder}: {name} is missing")
        if sha256_of(path) != expected:
            what = "card" if name == PACKAGE_CARD else "file"
            raise InputError(f"model package {folder}: {name} does not match its sha256 in {PACKAGE_SUMS}; the {what} "
                             "is corrupt or was modified")
    card = read_model_card(folder)
    weights = card.get("weights", "weights.pt")
    if weights not in listed:
        raise InputError(f"model package {folder}: {PACKAGE_SUMS} does not list the weights file {weights}")
    if card.get("sha256") != listed[weights]:
        raise InputError(f"model package {folder}: the card's sha256 is not the hash of {weights}")
    check_card_consistency(card, folder)
    members = card.get("ensemble") or []
    if members and (not isinstance(members, list) or not all(isinstance(m, dict) and "weights" in m for m in members)
                    or members[0]["weights"] != weights):
        raise InputError(f"model package {folder}: the card's ensemble must list its members' weights files, "
                         f"{weights} first")
    for m in members[1:]:
        if m["weights"] not in listed:
            raise InputError(f"model package {folder}: {PACKAGE_SUMS} does not list the ensemble member {m['weights']}")
        if m.get("sha256") != listed[m["weights"]]:
            raise InputError(f"model package {folder}: the card's sha256 of ensemble member {m['weights']} is not the "
                             "hash of that file")
    for name in [weights] + [m["weights"] for m in members[1:]]:
        check_weights_archive(folder / name)
    return card


def check_card_consistency(card: dict[str, Any], where: str | Path) -> None:
    """The card's labels and inputs must match the network it declares (a hand-edited card is refused)."""
    net = card.get("network") or {}
    preset = card["preset"]
    if "out_channels" in net and len(preset["labels"]) != int(net["out_channels"]):
        raise InputError(f"model {where}: the card lists {len(preset['labels'])} labels (background included) but the "
                         f"network has {net['out_channels']} outputs")
    if "in_channels" in net and len(preset["channels"]) != int(net["in_channels"]):
        raise InputError(f"model {where}: the card lists {len(preset['channels'])} input(s) but the network takes "
                         f"{net['in_channels']}")


def check_weights_archive(path: Path) -> None:
    """Without torch: a ``torch.save`` file is a zip archive; a truncated or damaged one fails its CRC check."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            names = z.namelist()
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise InputError(f"model package {path.parent}: {path.name} is damaged or truncated ({e})") from e
    if bad is not None:
        raise InputError(f"model package {path.parent}: {path.name} is damaged ({bad} fails its CRC check)")
    if not any(n.endswith("data.pkl") for n in names):
        raise InputError(f"model package {path.parent}: {path.name} is not a torch weights file")


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
    folders = folders if folders is not None else [builtin_models_dir(), user_models_dir()]
    found = []
    for i, folder in enumerate(folders):
        if not folder.is_dir():
            continue
        for pkg in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entry: dict[str, Any] = {"id": pkg.name, "path": str(pkg), "source": "builtin" if i == 0 else "user",
                                     "title": pkg.name, "card": None, "status": "ok"}
            try:
                card = read_model_card(pkg)
                entry["card"] = card
                entry["title"] = card.get("title") or card["preset"].get("title") or pkg.name
                verify_package(pkg)
            except InputError as e:
                entry["status"] = str(e)
            found.append(entry)
    return found


def model_summary(model: dict[str, Any]) -> tuple[str, str]:
    """How to show one of ``list_models()`` (the panel's model selector, ``dsdseg models list/show``): a one-line
    text (title, version, a non-commercial licence, user model, problem) and a description (what the card says a
    researcher needs before using it: inputs in order, segments, training data, validation Dice, network, CPU time,
    licence)."""
    card = model.get("card") or {}
    licence = card.get("licence") or {}
    text = model["title"] + (f" {card['version']}" if card.get("version") else "")
    if licence.get("non_commercial"):
        text += " (non-commercial)"
    if model.get("source") == "user":
        text += " (user)"
    if model.get("status", "ok") != "ok":
        text += " — unavailable: " + str(model["status"])
        return text, str(model["status"])
    preset = card.get("preset") or {}
    lines = [f"{model.get('id', '')} {card.get('version', '')}".strip()]
    if card.get("inputs") or preset.get("channels"):
        inputs = card.get("inputs") or preset["channels"]
        lines.append("Inputs, in this order: " + ", ".join(inputs))
        if len(inputs) > 1:  # measured with bench_misregistration.py; the run's notes warn (registration_check.py)
            lines.append("Register the inputs to each other to within about 1 mm: the run warns from 1.5 mm")
    labels = [name for value, name in sorted((preset.get("labels") or {}).items(), key=lambda kv: int(kv[0]))
              if str(value) != "0"]
    if labels:
        lines.append("Segments: " + ", ".join(labels))
    data = card.get("training_data") or {}
    if data.get("name"):
        lines.append(f"Trained on: {data['name']}" + (f", {data['train_cases']} cases" if data.get("train_cases") else ""))
    validation = card.get("validation") or {}
    per_class = validation.get("per_class") or {}
    regions = list(preset.get("regions") or {})
    shown = regions or labels
    dice = [f"{name} {per_class[name]['dice']:.3f}" for name in shown if isinstance(per_class.get(name), dict)
            and per_class[name].get("dice") is not None]
    if dice:
        lines.append(f"Validation Dice ({validation.get('cases', '?')} held-out cases): " + ", ".join(dice)
                     + (f" ({validation['note']})" if validation.get("note") else ""))
    indices = validation.get("clinical_indices") or {}
    ef = [f"{name[:-len(' ejection fraction')]} {entry['bias']:+.1f} ± {entry['sd']:.1f} points (r = {entry['r']:.2f})"
          for name, entry in sorted(indices.items()) if name.endswith(" ejection fraction")]
    if ef:
        patients = max(int(e.get("patients", 0)) for e in indices.values())
        lines.append(f"Ejection fraction, model − manual reference ({patients} held-out patients): " + ", ".join(ef))
    network = (card.get("network") or {}).get("backbone", "")
    members = card.get("ensemble") or []
    if members:
        kinds = ["DSD" if (m.get("dsd") or {}).get("encoder_kl") or (m.get("dsd") or {}).get("decoder_kl") else "plain"
                 for m in members]
        lines.append(f"Network: ensemble of {len(members)} {network} ({' + '.join(kinds)}), probabilities averaged")
    elif network:
        mode = (card.get("training") or {}).get("dsd")
        how = {"dsd": "trained with DSD", "plain": "trained plain (no DSD heads)", "ds": "trained with deep supervision"}
        lines.append(f"Network: {network}" + (f", {how.get(mode, f'trained with {mode}')}" if mode else ""))
    seconds = (card.get("expected_seconds") or {}).get("cpu")
    if seconds:
        lines.append(f"About {seconds:.0f} s per case on a CPU" if seconds >= 1 else "Under a second per case on a CPU")
    if licence.get("text"):
        lines.append("Licence: " + licence["text"])
    return text, "\n".join(lines)
