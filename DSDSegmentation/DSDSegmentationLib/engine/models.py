"""Loading trained models for inference: a run folder, a checkpoint, or an exported model package.

A model package is a folder with ``model.json`` (task preset, network, DSD settings, weights file name and its
sha256) and the head-free backbone weights, loadable with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cards import PACKAGE_CARD, verify_package, write_checksums
from .config import DSDConfig, NetworkConfig
from .errors import InputError
from .outputs import apply_umask
from .models_sha import sha256_of
from .networks import DSDNet
from .tasks import TaskPreset

WEIGHTS_FILE = "weights.pt"


@dataclass
class LoadedModel:
    """An eval-mode plain backbone plus what inference needs to know about it."""

    network: torch.nn.Module
    preset: TaskPreset
    net_config: NetworkConfig
    source: str
    card: dict[str, Any]
    # the training-only DSD heads of a checkpoint (None for a package, which ships without them): a run that
    # continues from a checkpoint with the same network and heads starts from them instead of fresh ones
    heads_state: dict[str, torch.Tensor] | None = None


def _from_checkpoint(path: Path) -> LoadedModel:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read checkpoint {path}: {e}") from e
    for key in ("model", "network", "dsd", "preset"):
        if key not in state:
            raise InputError(f"{path} is not a DSDSegmentation checkpoint (missing '{key}')")
    net_cfg = NetworkConfig.from_dict(state["network"])
    model = DSDNet(net_cfg, DSDConfig.from_dict(state["dsd"]))
    model.load_state_dict(state["model"])
    card = {"network": state["network"], "dsd": state["dsd"], "preset": state["preset"], "epoch": state.get("epoch"),
            "best_val_dice": state.get("best")}
    from .cards import check_card_consistency

    check_card_consistency(card, path)
    return LoadedModel(model.export_backbone().eval(), TaskPreset.from_dict(state["preset"]), net_cfg, str(path), card,
                       heads_state=model.heads.state_dict())


def _from_package(folder: Path) -> LoadedModel:
    card = verify_package(folder)  # files, sha256, labels vs network outputs, weights archive intact
    weights = folder / card.get("weights", WEIGHTS_FILE)
    net_cfg = NetworkConfig.from_dict(card["network"])
    backbone = DSDNet(net_cfg, DSDConfig.preset("plain")).backbone
    try:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        backbone.load_state_dict(sd)
    except Exception as e:  # noqa: BLE001
        raise InputError(f"model package {folder}: weights do not load into the declared network: {e}") from e
    return LoadedModel(backbone.eval(), TaskPreset.from_dict(card["preset"]), net_cfg, str(folder), card)


def load_model(source: str | Path) -> LoadedModel:
    """Load from a model package folder, a training run folder (best.pt, else last.pt) or a checkpoint file."""
    p = Path(source)
    if p.is_dir() and (p / PACKAGE_CARD).is_file():
        return _from_package(p)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return _from_checkpoint(p / name)
        raise InputError(f"{p} holds no model ({PACKAGE_CARD}, best.pt or last.pt)")
    if p.is_file():
        return _from_checkpoint(p)
    raise InputError(f"model {p} does not exist")


WEIGHTS_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def export_package(source: str | Path, out_dir: str | Path, extra_card: dict[str, Any] | None = None,
                   weights_dtype: str = "float32") -> Path:
    """Write a model package (head-free weights + card with sha256) from a run folder or checkpoint, atomically.

    ``weights_dtype="float16"`` stores the weights at half the size (recorded in the card); loading copies them into
    the float32 network, so inference arithmetic is unchanged and only the rounding of the weights differs."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise InputError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    loaded = load_model(source)
    out = Path(out_dir)
    if out.exists():
        raise InputError(f"{out} already exists; choose a new folder for the model package")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-pkg-", dir=out.parent))
    try:
        dtype = WEIGHTS_DTYPES[weights_dtype]
        state, converted = {}, {}
        for k, v in loaded.network.state_dict().items():
            if not v.is_floating_point():
                state[k] = v
                continue
            # one module under several names (DynUNet's skip layers) shares its tensors: convert once, keep sharing
            key = (v.data_ptr(), tuple(v.shape), v.stride())
            state[k] = converted[key] if key in converted else converted.setdefault(key, v.to(dtype))
        torch.save(state, tmp / WEIGHTS_FILE)
        card = {**loaded.card, **(extra_card or {}), "weights": WEIGHTS_FILE, "sha256": sha256_of(tmp / WEIGHTS_FILE),
                "parameters": sum(p.numel() for p in loaded.network.parameters())}
        card.pop("weights_dtype", None)
        if weights_dtype != "float32":
            card["weights_dtype"] = weights_dtype
        (tmp / PACKAGE_CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
        write_checksums(tmp, [PACKAGE_CARD, WEIGHTS_FILE])
        for f in (tmp, *tmp.iterdir()):
            apply_umask(f)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
