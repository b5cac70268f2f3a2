"""The engine is Qt-free and Slicer-free: it never imports slicer, qt, ctk or vtk."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import DSDSegmentationLib.engine as engine

FORBIDDEN = {"slicer", "qt", "ctk", "vtk", "mrml", "PythonQt"}


def test_engine_source_has_no_forbidden_imports() -> None:
    root = Path(engine.__file__).parent
    files = list(root.rglob("*.py"))
    assert len(files) > 5
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in FORBIDDEN, f"{f}: imports {n}"


def test_importing_engine_loads_no_gui_modules() -> None:
    code = (
        "import sys, DSDSegmentationLib.engine, DSDSegmentationLib.worker.cli;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _imports(f: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(f.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
    return [n.split(".")[0] for n in names]


def test_rooms_import_only_what_they_may() -> None:
    """The four rooms are folders: engine (torch/MONAI), worker (engine + plain VTK for offscreen renders),
    bridge (MRML + vtk, never Qt/CTK and never torch/MONAI: the worker runs the model), widget (the module file)."""
    lib = Path(engine.__file__).parent.parent
    assert sorted(p.name for p in lib.iterdir() if p.is_dir() and not p.name.startswith("__")) == ["bridge", "engine", "worker"]
    assert sorted(p.name for p in lib.glob("*.py")) == ["__init__.py"], "every module lives in a room"
    for f in (lib / "worker").glob("*.py"):
        bad = set(_imports(f)) & {"slicer", "qt", "ctk", "mrml", "PythonQt"}
        assert not bad, f"{f.name} imports {bad}"
    for f in (lib / "bridge").glob("*.py"):
        bad = set(_imports(f)) & {"qt", "ctk", "PythonQt", "torch", "monai"}
        assert not bad, f"{f.name} imports {bad}"


def test_the_panel_opens_before_torch_is_installed() -> None:
    """What the widget imports to open the panel (setup: controllers, the bridge, the model list, terminology,
    dependency planning) works without torch and MONAI, which PyTorch Utils and the consent dialog install on first
    use; only the QA logic (metrics) needs them, imported on first use after ensureDependencies. Run with both
    blocked, as in a fresh Slicer or on the Extensions factory."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'monai'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import DSDSegmentationLib.bridge.controllers, DSDSegmentationLib.bridge.logic, DSDSegmentationLib.bridge.interactive\n"
        "import DSDSegmentationLib.bridge.terminology, DSDSegmentationLib.bridge.dependencies\n"
        "from DSDSegmentationLib.engine.cards import list_models, model_summary, user_models_dir\n"
        "models = list_models()\n"
        "assert models and all(model_summary(m) for m in models)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


def test_slicers_own_process_never_loads_torch_dynamo() -> None:
    """What Slicer's main process runs (the bridge, QA metrics and worst errors) never imports torch._dynamo, which
    pulls in triton with CUDA builds of torch: importing triton after Mesa's libLLVM is loaded (any VTK OpenGL render
    on Mesa) crashes the process (segmentation fault, reproduced in session 11 with PyPI's torch 2.13.0 on Python
    3.12). Training, which imports it through the optimiser, runs only in the worker process."""
    code = (
        "import sys, numpy as np\n"
        "import DSDSegmentationLib.bridge.qa_logic, DSDSegmentationLib.bridge.controllers, DSDSegmentationLib.bridge.logic\n"
        "import DSDSegmentationLib.bridge.interactive, DSDSegmentationLib.bridge.demo\n"
        "from DSDSegmentationLib.engine.metrics import class_metrics\n"
        "from DSDSegmentationLib.engine.qa import boundary_errors, uncertainty_scores\n"
        "a = np.zeros((20, 20, 20), bool); a[4:12, 4:12, 4:12] = True; b = np.roll(a, 2, 0)\n"
        "class_metrics(a, b, (1.0, 1.0, 1.0)); boundary_errors(a, b, (1.0, 1.0, 1.0))\n"
        "uncertainty_scores(np.random.rand(20, 20, 20), a.astype(int), {1: 'x'})\n"
        "print(sorted(m for m in sys.modules if m.startswith(('torch._dynamo', 'triton'))))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def test_the_panels_compare_loads_no_torch_in_slicers_process(tmp_path) -> None:
    """Since session 12 Compare's numbers and surfaces are computed in the worker: what Slicer's own process runs
    for it (the bridge, the controllers, writing the request) imports neither torch nor MONAI."""
    code = (
        "import sys, numpy as np\n"
        "import DSDSegmentationLib.bridge.qa_logic, DSDSegmentationLib.bridge.controllers, DSDSegmentationLib.bridge.logic\n"
        "import DSDSegmentationLib.bridge.interactive\n"
        "from DSDSegmentationLib.worker.qa_panel import write_panel_request\n"
        "a = np.zeros((20, 20, 20), bool); a[4:12, 4:12, 4:12] = True\n"
        f"write_panel_request({str(tmp_path)!r}, [('x', a, np.roll(a, 2, 0))], (1.0, 1.0, 1.0), np.eye(4))\n"
        "print(sorted(m for m in ('torch', 'monai') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(Path(__file__).resolve().parents[2] / "DSDSegmentation"))
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    assert (tmp_path / "request.json").is_file() and (tmp_path / "masks.npz").is_file()
