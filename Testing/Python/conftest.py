"""Shared fixtures: real data from ../shared/data, deterministic torch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

try:
    import torch
except ImportError:  # the module-side lane (.ci/setup-slicer-py312): Slicer's own Python has no torch of ours
    torch = None

from DSDSegmentationLib.engine.data import find_shared_data

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # offscreen renders without X
sys.path.insert(0, str(Path(__file__).parent))  # test helpers (slicer_headless)
if os.environ.get("PYTEST_XDIST_WORKER") and "OMP_NUM_THREADS" not in os.environ:
    # pytest -n N: one thread per worker (and per worker subprocess); N workers x all cores oversubscribes the CPU
    os.environ["OMP_NUM_THREADS"] = "1"
    if torch is not None:
        torch.set_num_threads(1)

# The module-side lane runs the MRML bridge tests in a Python like Slicer 5.10's (3.12, numpy 2.0.2, no torch) and
# their worker in another Python that has torch (as Slicer runs its worker in PythonSlicer with PyTorch Utils' torch)
WORKER_PYTHON = os.environ.get("DSDSEG_TEST_WORKER_PYTHON")
if WORKER_PYTHON:
    from DSDSegmentationLib.worker import process as _process

    _worker_command = _process.worker_command
    _process.worker_command = lambda python, args: _worker_command(python or WORKER_PYTHON, args)


@pytest.fixture(autouse=True)
def _deterministic() -> None:
    if torch is not None:
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


def lazy_predictor(*args, **kwargs):
    """The engine's Predictor, imported when a test uses it: it needs torch, which the module-side lane
    (Slicer's Python 3.12, .ci/setup-slicer-py312) does not have in the test process."""
    from DSDSegmentationLib.engine.inference import Predictor

    return Predictor(*args, **kwargs)


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
    import numpy

    return (f"slicer-core {core}, numpy {numpy.__version__}, Python {sys.version.split()[0]}, torch "
            f"{torch.__version__ if torch is not None else 'none in this process'}"
            + (f", worker Python {WORKER_PYTHON}" if WORKER_PYTHON else ""))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Module-side lane only (no torch in this process): a test that stops because *the test itself* imports the
    engine's torch parts (to compute what it expects, or to train in-process) is reported as skipped with that
    reason; it runs fully in the main lane. Every other failure stays a failure."""
    outcome = yield
    report = outcome.get_result()
    if torch is None and call.excinfo is not None and report.failed:
        exc = call.excinfo.value
        # through the module or its Slicer-side bridge, a torch import is the product's failure (Slicer's own process
        # must never import torch); bridge/demo.py is the headless demo, run by .ci/demo in the main environment
        paths = [str(entry.path) for entry in call.excinfo.traceback]
        slicer_side = any(("DSDSegmentationLib/bridge/" in p and not p.endswith("demo.py")) or p.endswith("DSDSegmentation.py")
                          for p in paths)
        if isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "monai") and not slicer_side:
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0,
                               f"needs {exc.name} in the test process (module-side lane: .ci/run runs it in "
                               ".venv-slicer-oldest)")
            record = os.environ.get("DSDSEG_SKIPPED_TO")  # .ci/run re-runs these in the oldest environment
            if record:
                with open(f"{record}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}", "a", encoding="utf-8") as f:
                    f.write(item.nodeid + "\n")
