"""Static checks of the Slicer module files that CI can run without Slicer: the .ui, the widget code and the
parameter node agree; the extension CMake and catalog entry are complete."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "DSDSegmentation" / "DSDSegmentation.py"
UI = ROOT / "Resources" / "UI" / "DSDSegmentation.ui"


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def parameter_fields() -> set[str]:
    tree = ast.parse(MODULE.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DSDSegmentationParameterNode"]
    return {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)}


def test_widget_code_uses_only_widgets_of_the_ui() -> None:
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    used |= {f"inputLabel{i}" for i in range(4)} | {f"inputVolumeSelector{i}" for i in range(4)}  # getattr(...)
    missing = used - set(ui_widgets())
    assert not missing, f"widgets used in DSDSegmentation.py but absent from the .ui: {sorted(missing)}"


def test_ui_bindings_are_parameter_node_fields() -> None:
    bound = {}
    for name, w in ui_widgets().items():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = prop.find("string").text
    assert set(bound.values()) <= parameter_fields(), (bound, parameter_fields())
    assert {"inputVolume0", "outputSegmentation", "device", "tta"} <= set(bound.values())


def test_extension_files() -> None:
    top = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top and "add_subdirectory(DSDSegmentation)" in top
    module_cmake = (ROOT / "DSDSegmentation" / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule" in module_cmake and "slicer_add_python_unittest" in module_cmake
    assert (ROOT / "Resources" / "Icons" / "DSDSegmentation.png").is_file()
    entry = json.loads((ROOT / "Resources" / "ExtensionsIndex" / "DSDSegmentation.json").read_text())
    assert {"$schema", "category", "scm_url"} <= set(entry) and entry["build_dependencies"] == ["PyTorch"]
    reqs = (ROOT / "Resources" / "requirements.txt").read_text().lower()
    for never in ("numpy", "simpleitk", "vtk", "requests", "torch"):
        assert not re.search(rf"^{never}\b", reqs, re.M), f"{never} must not be installed by the extension"
