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
        "import sys, DSDSegmentationLib.engine, DSDSegmentationLib.cli;"
        f"bad = [m for m in sys.modules if m.split('.')[0] in {sorted(FORBIDDEN)!r}];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
