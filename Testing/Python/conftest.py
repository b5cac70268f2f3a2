"""Shared fixtures: real data from ../shared/data, deterministic torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

from DSDSegmentationLib.engine.data import find_shared_data

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen renders without X
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (slicer_headless)
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # pytest -n N: one thread per worker (and per worker subprocess); N workers x all cores oversubscribes the CPU
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def hippocampus_dir() -> Path:
    """MSD Task04 hippocampus folder (a clear error, not a skip, when the data is missing)."""
    return find_shared_data() / "Task04_Hippocampus"


def tampered_copy(package: Path, folder: Path, name: str) -> Path:
    """A copy of a model package in ``folder`` with one byte of its file ``name`` flipped near the end."""
    import shutil

    shutil.copytree(package, folder)
    data = bytearray((folder / name).read_bytes())
    data[-100] ^= 0xFF
    (folder / name).write_bytes(bytes(data))
    return folder


def renamed_copy(package: Path, parent: Path, new_id: str) -> Path:
    """A valid copy of a model package under another id (a colleague's model): folder, card id and SHA256SUMS."""
    import json
    import shutil

    from DSDSegmentationLib.engine.cards import PACKAGE_SUMS, write_checksums

    folder = parent / new_id
    shutil.copytree(package, folder)
    card = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    card["id"] = new_id
    (folder / "model.json").write_text(json.dumps(card, indent=2), encoding="utf-8")
    write_checksums(folder, [line.split()[1] for line in (folder / PACKAGE_SUMS).read_text().splitlines() if line])
    return folder


@pytest.fixture
def scene():
    """A real MRML scene (slicer-core, no Qt) with the module logics the bridge needs; cleared afterwards."""
    pytest.importorskip("slicer", reason="slicer-core is part of the test install (.ci/setup)")
    from DSDSegmentationLib.bridge.headless import setup_headless

    scene, _app, _mods = setup_headless()
    yield scene
    scene.Clear(1)


def pytest_report_header(config) -> str:
    import importlib.metadata as md

    try:
        core = md.version("slicer-core")
    except md.PackageNotFoundError:
        core = "not installed"
    return f"slicer-core {core}, torch {torch.__version__}"
