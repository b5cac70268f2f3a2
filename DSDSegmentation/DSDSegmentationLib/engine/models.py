"""Loading trained models for inference: a run folder, a checkpoint, or an exported model package.

A model package is a folder with ``model.json`` (task preset, network, DSD settings, weights file name and its
sha256) and the head-free backbone weights, loadable with ``torch.load(weights_only=True)``. An ensemble package
holds several trainings of the same network and preprocessing (``ensemble`` in the card: one weights file per
member); inference averages their class probabilities, as nnU-Net does with its folds.
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


def member_weights_file(i: int) -> str:
    """The weights file of an ensemble's member ``i`` (0-based): ``weights.pt``, ``weights-2.pt``, ..."""
    return WEIGHTS_FILE if i == 0 else f"weights-{i + 1}.pt"


class EnsembleNet(torch.nn.Module):
    """Networks of one architecture and preprocessing run on the same input; the output is the log of their mean
    softmax probabilities, so the softmax that inference applies (after the sliding window's blending) gives the
    members' mean probability map."""

    def __init__(self, members: list[torch.nn.Module]):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.stack([torch.softmax(m(x).float(), dim=1) for m in self.members]).mean(0)
        return mean.clamp_min(1e-12).log()


@dataclass
class LoadedModel:
    """An eval-mode plain backbone (or the average of an ensemble's) plus what inference needs to know about it."""

    network: torch.nn.Module
    preset: TaskPreset
    net_config: NetworkConfig
    source: str
    card: dict[str, Any]
    # the training-only DSD heads of a checkpoint (None for a package, which ships without them): a run that
    # continues from a checkpoint with the same network and heads starts from them instead of fresh ones
    heads_state: dict[str, torch.Tensor] | None = None
    # an ensemble package's member backbones (``network`` averages them); None for a single network
    members: list[torch.nn.Module] | None = None

    @property
    def backbones(self) -> list[torch.nn.Module]:
        """The plain backbone(s): one, or each member of an ensemble."""
        return list(self.members) if self.members else [self.network]


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A training checkpoint (``best.pt``, ``last.pt``) read without running code from the file: torch's
    ``weights_only`` unpickler, which builds only tensors and plain containers, plus what a checkpoint's numpy random
    state needs (arrays of uint32). A checkpoint that holds anything else (a pickled object can run any code when it
    is loaded: a file from someone else) is refused by name instead of being loaded."""
    import pickle

    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core  # numpy 2 / 1
    allowed = [np.ndarray, np.dtype, core.multiarray._reconstruct, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise InputError(f"{path} was not loaded: it holds Python objects other than tensors and numbers, which could "
                         "run code when loaded (a checkpoint from another source?); only checkpoints written by "
                         "dsdseg train are read") from e
    except Exception as e:  # noqa: BLE001
        raise InputError(f"cannot read checkpoint {path}: {e}") from e


def _from_checkpoint(path: Path) -> LoadedModel:
    state = load_checkpoint(path)
    if not isinstance(state, dict):
        raise InputError(f"{path} is not a DSDSegmentation checkpoint (not a dictionary)")
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
    card = verify_package(folder)  # files, sha256, labels vs network outputs, weights archives intact
    net_cfg = NetworkConfig.from_dict(card["network"])
    files = [m["weights"] for m in card["ensemble"]] if card.get("ensemble") else [card.get("weights", WEIGHTS_FILE)]
    try:  # a member of another width names its own network; it shares the card's family (checked at export)
        configs = _member_networks(card)
    except (TypeError, ValueError) as e:
        raise InputError(f"model package {folder}: an ensemble member has an invalid network: {e}") from e
    nets = []
    for name, member_cfg in zip(files, configs):
        if _network_family(member_cfg) != _network_family(net_cfg):
            raise InputError(f"model package {folder}: ensemble member {name} is not a {net_cfg.backbone} with "
                             f"{net_cfg.in_channels} input(s), {net_cfg.out_channels} outputs and patch "
                             f"{list(net_cfg.patch_size)} like the card's network")
        backbone = DSDNet(member_cfg, DSDConfig.preset("plain")).backbone
        try:
            backbone.load_state_dict(torch.load(folder / name, map_location="cpu", weights_only=True))
        except Exception as e:  # noqa: BLE001
            raise InputError(f"model package {folder}: {name} does not load into the declared network: {e}") from e
        nets.append(backbone.eval())
    preset = TaskPreset.from_dict(card["preset"])
    if len(nets) == 1:
        return LoadedModel(nets[0], preset, net_cfg, str(folder), card)
    return LoadedModel(EnsembleNet(nets).eval(), preset, net_cfg, str(folder), card, members=nets)


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


def _network_family(config: NetworkConfig) -> tuple:
    """What every member of an ensemble shares: backbone, channels in and out, patch (the sliding window). The
    backbone's options (e.g. DynUNet's filters) may differ between members."""
    return config.backbone, config.in_channels, config.out_channels, tuple(config.patch_size)


def _preprocessing(preset: TaskPreset) -> dict[str, Any]:
    """The part of a preset that makes the members' inputs and outputs the same arrays (the ensemble runs one
    preprocessing, the first member's, and averages on one grid)."""
    d = preset.to_dict()
    return {k: d.get(k) for k in ("channels", "labels", "orientation", "spacing", "normalization", "patch_size",
                                  "crop_foreground")}


def _member_networks(card: dict[str, Any]) -> list[NetworkConfig]:
    """Each backbone's network configuration, from a card (an ensemble's members may differ in width: such a member
    names its own ``network``; the others are the card's)."""
    return [NetworkConfig.from_dict(m.get("network", card["network"])) for m in card.get("ensemble") or [{}]]


def _member_record(loaded: LoadedModel) -> list[dict[str, Any]]:
    """Where each network of ``loaded`` comes from (an ensemble package keeps its members' records)."""
    if loaded.card.get("ensemble"):
        return [{k: v for k, v in m.items() if k not in ("weights", "sha256")} for m in loaded.card["ensemble"]]
    src = Path(loaded.source)
    return [{"source": src.parent.name if src.is_file() else src.name, "dsd": loaded.card.get("dsd"),
             "epoch": loaded.card.get("epoch"), "best_val_dice": loaded.card.get("best_val_dice")}]


def export_package(source: str | Path, out_dir: str | Path, extra_card: dict[str, Any] | None = None,
                   weights_dtype: str = "float32", members: list[str | Path] | tuple = ()) -> Path:
    """Write a model package (head-free weights + card with sha256) from a run folder or checkpoint, atomically.

    ``weights_dtype="float16"`` stores the weights at half the size (recorded in the card); loading copies them into
    the float32 network, so inference arithmetic is unchanged and only the rounding of the weights differs.
    ``members``: further runs, checkpoints or packages of the same network, inputs and labels; with them (or when
    ``source`` is an ensemble package) the package is an ensemble whose probabilities are averaged."""
    if weights_dtype not in WEIGHTS_DTYPES:
        raise InputError(f"weights dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {weights_dtype!r}")
    loaded = load_model(source)
    others = [load_model(m) for m in members]
    for other in others:
        if _network_family(other.net_config) != _network_family(loaded.net_config):
            raise InputError(f"ensemble member {other.source} has another network than {loaded.source}")
        if _preprocessing(other.preset) != _preprocessing(loaded.preset):
            raise InputError(f"ensemble member {other.source} has other inputs, labels or preprocessing than "
                             f"{loaded.source}")
    nets = [n for m in (loaded, *others) for n in m.backbones]
    records = [r for m in (loaded, *others) for r in _member_record(m)]
    # a member of another width (the backbone's options, e.g. DynUNet filters) records its own network
    configs = [c for m in (loaded, *others) for c in _member_networks(m.card)]
    for record, config in zip(records, configs):
        record.pop("network", None)
        if config.to_dict() != loaded.net_config.to_dict():
            record["network"] = config.to_dict()
    out = Path(out_dir)
    if out.exists():
        raise InputError(f"{out} already exists; choose a new folder for the model package")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-pkg-", dir=out.parent))
    try:
        dtype = WEIGHTS_DTYPES[weights_dtype]
        names = [member_weights_file(i) for i in range(len(nets))]
        for net, name in zip(nets, names):
            state, converted = {}, {}
            for k, v in net.state_dict().items():
                if not v.is_floating_point():
                    state[k] = v
                    continue
                # one module under several names (DynUNet's skip layers) shares its tensors: convert once, keep sharing
                key = (v.data_ptr(), tuple(v.shape), v.stride())
                state[k] = converted[key] if key in converted else converted.setdefault(key, v.to(dtype))
            torch.save(state, tmp / name)
        card = {**loaded.card, **(extra_card or {}), "weights": WEIGHTS_FILE, "sha256": sha256_of(tmp / WEIGHTS_FILE),
                "parameters": sum(p.numel() for p in nets[0].parameters())}
        if others and "validation" not in (extra_card or {}) and isinstance(card.get("validation"), dict):
            # new members make another model: what the source's card measured is not this ensemble's. Its Dice stays
            # for reference, with a note; its agreement with reference volumes (quoted beside every EF) goes
            card["validation"] = {k: v for k, v in card["validation"].items() if k != "clinical_indices"}
            card["validation"]["note"] = (f"measured for {card.get('id', loaded.source)} {card.get('version', '')} "
                                          "alone, not for this ensemble: re-measure it (package_model.py)").replace("  ", " ")
        card.pop("ensemble", None)
        if len(nets) > 1:
            card["ensemble"] = [{"weights": n, "sha256": sha256_of(tmp / n), **r} for n, r in zip(names, records)]
        card.pop("weights_dtype", None)
        if weights_dtype != "float32":
            card["weights_dtype"] = weights_dtype
        (tmp / PACKAGE_CARD).write_text(json.dumps(card, indent=2), encoding="utf-8")
        write_checksums(tmp, [PACKAGE_CARD, *names])
        for f in (tmp, *tmp.iterdir()):
            apply_umask(f)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out
