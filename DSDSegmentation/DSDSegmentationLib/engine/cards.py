"""Reading what a model is (task preset, labels, colours, inputs) without torch: from a model package's
``model.json`` or a training run's ``config.json``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError


def read_model_card(source: str | Path) -> dict[str, Any]:
    """The card of a model package folder, or the equivalent of a training run folder."""
    p = Path(source)
    if (p / "model.json").is_file():
        try:
            card = json.loads((p / "model.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise InputError(f"model {p}: model.json is not valid JSON: {e}") from e
    elif (p / "config.json").is_file() and ((p / "best.pt").is_file() or (p / "last.pt").is_file()):
        cfg = json.loads((p / "config.json").read_text(encoding="utf-8"))
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
