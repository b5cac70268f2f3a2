"""Locating datasets and listing MSD-style cases (the full dataset layer arrives with the pipeline)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import InputError

DATA_ENV = "DSDSEG_DATA"


def find_shared_data() -> Path:
    """The folder holding the project's shared datasets.

    Order: ``$DSDSEG_DATA``; ``../shared/data`` beside the working directory or beside the repository.
    """
    env = os.environ.get(DATA_ENV)
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[3]
    candidates += [Path.cwd().parent / "shared" / "data", repo.parent / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    raise InputError(
        "no dataset folder found: set $DSDSEG_DATA or place the data in ../shared/data "
        f"(looked in: {', '.join(str(c) for c in candidates)})"
    )


def msd_cases(root: str | Path, limit: int | None = None) -> list[dict[str, str]]:
    """Image/label pairs of an MSD-style ``dataset.json`` in ``root``, sorted by image name."""
    root = Path(root)
    meta = root / "dataset.json"
    if not meta.is_file():
        raise InputError(f"{root} has no dataset.json (expected an MSD-style dataset folder)")
    with open(meta, encoding="utf-8") as f:
        entries = json.load(f).get("training", [])
    cases = []
    for e in sorted(entries, key=lambda e: e["image"]):
        image, label = root / e["image"], root / e["label"]
        for p in (image, label):
            if not p.is_file():
                raise InputError(f"case {Path(e['image']).name}: file {p} listed in dataset.json is missing")
        cases.append({"image": str(image), "label": str(label)})
    if not cases:
        raise InputError(f"{meta} lists no training cases")
    return cases[:limit] if limit else cases
