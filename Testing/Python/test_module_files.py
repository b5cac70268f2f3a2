"""Static checks of the Slicer module files that CI can run without Slicer: the .ui, the widget code and the
parameter node agree; the extension CMake and catalog entry are complete."""

from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODULE = ROOT / "DSDSegmentation" / "DSDSegmentation.py"
UI = ROOT / "Resources" / "UI" / "DSDSegmentation.ui"


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget")}


def _parameter_node_fields() -> list[ast.AnnAssign]:
    """The field declarations of the module's parameter node class."""
    tree = ast.parse(MODULE.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DSDSegmentationParameterNode"]
    return [n for n in cls.body if isinstance(n, ast.AnnAssign)]


def parameter_fields() -> set[str]:
    return {n.target.id for n in _parameter_node_fields()}


def _bound_field(widget: ET.Element) -> str | None:
    """The parameter node field a .ui widget is bound to (its SlicerParameterName), or None."""
    return next((p.find("string").text for p in widget.findall("property") if p.get("name") == "SlicerParameterName"),
                None)


def test_widget_code_uses_only_widgets_of_the_ui() -> None:
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text()))
    used |= {f"inputLabel{i}" for i in range(4)} | {f"inputVolumeSelector{i}" for i in range(4)}  # getattr(...)
    missing = used - set(ui_widgets())
    assert not missing, f"widgets used in DSDSegmentation.py but absent from the .ui: {sorted(missing)}"


# Non-Qt widget classes a .ui may use: each has a Qt Designer plugin in Slicer 5.10 (v5.10.0:
# Libs/MRML/Widgets/DesignerPlugins/<class>Plugin.h) or in the CTK commit Slicer 5.10 pins (dd4caea:
# Libs/Widgets/Plugins/<class>Plugin.h), so slicer.util.loadUI creates the real widget and not a bare QWidget whose
# methods (e.g. qMRMLPlotWidget.mrmlPlotViewNode) would be missing at run time. A new class: check it there, add it.
UI_CLASSES_CHECKED_AT_V5_10 = {"ctkCollapsibleButton", "ctkPathLineEdit", "qMRMLNodeComboBox", "qMRMLPlotWidget",
                               "qMRMLTableView", "qMRMLWidget"}


def test_ui_widget_classes_have_designer_plugins_in_slicer_5_10() -> None:
    used = {w.get("class") for w in ET.parse(UI).getroot().iter("widget")}
    custom = {c for c in used if not c.startswith("Q")}
    assert custom - UI_CLASSES_CHECKED_AT_V5_10 == set(), sorted(custom - UI_CLASSES_CHECKED_AT_V5_10)
    declared = {c.findtext("class") for c in ET.parse(UI).getroot().iter("customwidget")}
    assert custom <= declared, f"custom widgets without a <customwidget> entry: {sorted(custom - declared)}"


def test_ui_bindings_are_parameter_node_fields() -> None:
    bound = {name: field for name, w in ui_widgets().items() if (field := _bound_field(w))}
    assert set(bound.values()) <= parameter_fields(), (bound, parameter_fields())
    assert {"inputVolume0", "outputSegmentation", "device", "tta"} <= set(bound.values())


def _field_annotations() -> dict[str, dict[str, list]]:
    """Per parameter node field, the arguments of each call in its annotation: {'WithinRange': [1, 2000], ...}."""
    out = {}
    for n in _parameter_node_fields():
        calls = [c for c in ast.walk(n.annotation) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)]
        out[n.target.id] = {c.func.id: [ast.literal_eval(a) for a in c.args] for c in calls}
    return out


def _ui_number(widget: ET.Element, prop: str):
    for p in widget.findall("property"):
        if p.get("name") == prop:
            return ast.literal_eval("".join(p.itertext()).strip())
    return None


# Slicer 5.10's parameter node GUI connectors (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at v5.10.0):
# a spin box or slider bound to an int/float field gets its range from the field's WithinRange (or Minimum/Maximum)
# annotation and, without one, -inf..inf (float) or -2**31..2**31-1 (int), whatever the .ui says; Decimals and
# SingleStep annotations likewise replace the .ui's. A QComboBox bound to a str field with Choice gets exactly the
# choices as its items.
RANGED_WIDGETS = {"QSpinBox", "QSlider", "QDoubleSpinBox", "ctkSliderWidget", "ctkDoubleSpinBox", "ctkDoubleSlider",
                  "qMRMLSliderWidget", "qMRMLSpinBox"}


def test_spin_boxes_keep_their_range_in_slicer() -> None:
    annotations = _field_annotations()
    tree = ast.parse((ROOT / "DSDSegmentation" / "DSDSegmentationLib" / "bridge" / "controllers.py").read_text())
    (ranges,) = [ast.literal_eval(n.value) for n in tree.body
                 if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "RANGES"]
    checked = set()
    for name, w in ui_widgets().items():
        field = _bound_field(w)
        if field is None:
            continue
        ann = annotations[field]
        if w.get("class") in RANGED_WIDGETS:
            assert "WithinRange" in ann, f"{name} ({field}): no WithinRange, so Slicer would let it take any value"
            low, high = ann["WithinRange"]
            assert (low, high) == (_ui_number(w, "minimum"), _ui_number(w, "maximum")), (name, ann, "the .ui's range")
            assert (low, high) == tuple(ranges[field][1:]), (name, "the controllers' RANGES")
            if _ui_number(w, "decimals") is not None and "Decimals" in ann:
                assert ann["Decimals"] == [_ui_number(w, "decimals")], name
            if _ui_number(w, "singleStep") is not None and "SingleStep" in ann:
                assert ann["SingleStep"] == [_ui_number(w, "singleStep")], name
            checked.add(field)
        if w.get("class") == "QComboBox":
            assert "Choice" in ann, f"{name} ({field}): a QComboBox binds only with a Choice annotation in Slicer 5.10"
            items = ["".join(i.itertext()).strip() for i in w.findall("item")]
            assert ann["Choice"] == [items], (name, "the .ui's items are replaced by the choices")
    assert checked == set(ranges), (checked, set(ranges))


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


def _widget_source() -> str:
    tree = ast.parse(MODULE.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DSDSegmentationWidget"]
    return ast.get_source_segment(MODULE.read_text(), cls)


def test_widget_is_binding_only() -> None:
    """Decisions live in the controllers: the widget holds no timer but the one that drives them, no model-card
    rules, no prompt or run bookkeeping."""
    src = _widget_source()
    assert src.count("qt.QTimer()") == 1
    for decision in ('["card"]', "size_mm", "GetNumberOfControlPoints", "GetActiveControlPoint", "_pending",
                     "_regions", "debounce", "PointPositionDefinedEvent", "match_segments", "build_finetune_dataset"):
        assert decision not in src, f"the widget decides something: {decision}"
    assert len(src.splitlines()) < 330


def test_module_and_bridge_use_only_apis_of_the_oldest_slicer() -> None:
    """vtkSegment.SetTerminology/GetTerminology and IsTerminologyContextLoaded are newer than the tag API; one
    helper (bridge/terminology.py) uses SetTag/GetTag with GetTerminologyEntryTagName()."""
    files = [MODULE, *sorted((ROOT / "DSDSegmentation" / "DSDSegmentationLib" / "bridge").glob("*.py"))]
    for f in files:
        text = f.read_text()
        for newer in (".SetTerminology(", ".GetTerminology(", "IsTerminologyContextLoaded("):
            assert newer not in text, f"{f.name} calls {newer}"


def slicer_util_calls(files: list[Path]) -> list[tuple[str, str, set[str], int]]:
    """Every ``slicer.util.<name>(...)`` call: (file, name, keyword names, number of positional arguments)."""
    calls = []
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Attribute) and node.func.value.attr == "util"
                    and isinstance(node.func.value.value, ast.Name) and node.func.value.value.id == "slicer"):
                calls.append((f.name, node.func.attr, {k.arg for k in node.keywords if k.arg}, len(node.args)))
    return calls


def test_slicer_util_calls_exist_in_the_oldest_supported_slicer() -> None:
    """slicer.util functions and keyword arguments as Slicer 5.10.0 defines them (a snapshot of the public function
    signatures of Base/Python/slicer/util.py at the git tag v5.10.0: Testing/Python/slicer_util_v5.10.0.json); a
    call to a function or keyword added later would fail in Slicer 5.10 and fails here."""
    api = json.loads((Path(__file__).parent / "slicer_util_v5.10.0.json").read_text())["functions"]
    files = [MODULE, *sorted((ROOT / "DSDSegmentation" / "DSDSegmentationLib" / "bridge").glob("*.py")),
             ROOT / "Testing" / "Slicer" / "run_selftest.py"]
    calls = slicer_util_calls(files)
    assert len({name for _, name, _, _ in calls}) >= 10  # the parser finds the module's calls
    problems = []
    for file, name, keywords, positional in calls:
        sig = api.get(name)
        if sig is None:
            problems.append(f"{file}: slicer.util.{name} does not exist in Slicer 5.10.0")
            continue
        if not sig["varkw"] and keywords - set(sig["params"]):
            problems.append(f"{file}: slicer.util.{name} has no keyword(s) {sorted(keywords - set(sig['params']))} in 5.10.0")
        if not sig["varargs"] and positional > len(sig["params"]):
            problems.append(f"{file}: slicer.util.{name} takes at most {len(sig['params'])} arguments in 5.10.0")
    assert not problems, problems
    # the check itself: a keyword that 5.10.0 lacks is caught
    assert "foregroundOpacity" in api["setSliceViewerLayers"]["params"] and "opacity" not in api["setSliceViewerLayers"]["params"]


def test_slicer_methods_called_were_checked_at_the_oldest_slicer_tag() -> None:
    """Every CamelCase method the module and the MRML bridge call is on the list checked in Slicer's source at the
    tag v5.10.0 (slicer-core's oldest wheel is 5.11, so the headless tests alone would not catch a 5.11 API)."""
    lines = (Path(__file__).parent / "slicer_methods_v5.10.0.txt").read_text().splitlines()
    checked = {line.split()[0] for line in lines if line and not line.startswith("#")}
    files = [MODULE, *sorted((ROOT / "DSDSegmentation" / "DSDSegmentationLib" / "bridge").glob("*.py"))]
    called = {m for f in files for m in re.findall(r"\.([A-Z][A-Za-z0-9]+)\(", f.read_text())}
    assert len(called) > 100
    assert not called - checked, f"check these at Slicer's v5.10.0 tag, then list them: {sorted(called - checked)}"


def test_logic_classes_have_distinct_names() -> None:
    bridge = (ROOT / "DSDSegmentation" / "DSDSegmentationLib" / "bridge" / "logic.py").read_text()
    assert "class DSDSegmentationLogic" not in bridge and "class SegmentationBridge" in bridge
    assert "class DSDSegmentationLogic(ScriptedLoadableModuleLogic)" in MODULE.read_text()


def test_dependency_plan() -> None:
    import importlib.metadata as md

    from DSDSegmentationLib.bridge import dependencies as deps

    reqs = deps.read_requirements((ROOT / "Resources" / "requirements.txt").read_text().splitlines())
    have = {"monai": "1.5.0", "nibabel": "5.3.2", "einops": "0.8.1", "pynrrd": "1.1.3", "scipy": "1.10.0"}
    actions = {a.name: a for a in deps.plan(reqs, have.get, modules={"scipy": object()})}
    assert actions["monai"].reason == "installed 1.5.0 does not satisfy ==1.6.1"
    assert actions["tqdm"].reason == "not installed"
    assert actions["scipy"].imported and "restart Slicer" in deps.describe(list(actions.values()))
    assert "nibabel" not in actions
    with pytest.raises(ValueError, match="Slicer's own package"):
        deps.plan(["numpy>=2"], have.get)
    # torch: at least what the pinned MONAI declares
    monai_torch = [r for r in md.requires("monai") if r.startswith("torch") and "extra" not in r]
    assert monai_torch == ["torch>=2.8.0"] and deps.TORCH_REQUIREMENT == ">=2.8"
    assert deps.torch_problem({"torch": "2.4.1+cu121"}.get) == "torch 2.4.1+cu121 is installed; MONAI needs torch>=2.8"
    assert deps.torch_problem({"torch": "2.13.0+cpu"}.get) is None
    assert deps.torch_problem({}.get) == "torch is not installed"
    assert "needs Slicer 5.10" in deps.slicer_version_problem(5, 8, (3, 9))
    assert deps.slicer_version_problem(5, 10, (3, 12)) is None


def test_install_pins_slicers_own_packages(tmp_path: Path) -> None:
    """The consented install passes pip a constraints file with Slicer's own packages at their installed versions;
    real pip reads it, accepts the environment as it is, and refuses a requirement that would replace numpy."""
    import importlib.metadata as md
    import subprocess
    import sys

    from DSDSegmentationLib.bridge import dependencies as deps

    actions = deps.plan(["monai==1.6.1", "tqdm>=4.66"], {"monai": "1.5.0"}.get, modules={})
    args = deps.install_arguments(actions, tmp_path)
    assert args[0] == "--constraint" and args[2:] == ["monai==1.6.1", "tqdm>=4.66"]
    pins = [ln for ln in Path(args[1]).read_text().splitlines() if not ln.startswith("#")]
    numpy = md.version("numpy")
    assert f"numpy=={numpy}" in pins and f"torch=={md.version('torch')}" in pins
    assert all(p.split("==")[0] in deps.PINNED_DURING_INSTALL for p in pins)
    # a local index with a "newer numpy" (a metadata-only wheel): without the constraints pip would take it
    import zipfile

    index = tmp_path / "index"
    index.mkdir()
    with zipfile.ZipFile(index / "numpy-999.0-py3-none-any.whl", "w") as z:
        z.writestr("numpy-999.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: numpy\nVersion: 999.0\n")
        z.writestr("numpy-999.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("numpy-999.0.dist-info/RECORD", "")
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--find-links", str(index),
           "--disable-pip-version-check"]
    free = subprocess.run([*pip, "numpy>=999"], capture_output=True, text=True)
    assert free.returncode == 0 and "numpy-999.0" in free.stdout, free.stdout + free.stderr
    pinned = subprocess.run([*pip, *args[:2], "numpy>=999"], capture_output=True, text=True)
    assert pinned.returncode != 0 and f"numpy=={numpy}" in pinned.stdout + pinned.stderr, pinned.stdout + pinned.stderr
    same = subprocess.run([*pip, *args[:2], f"numpy=={numpy}"], capture_output=True, text=True)
    assert same.returncode == 0, same.stderr


def test_supported_slicer_is_declared() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "Slicer 5.10" in readme and "Extensions Manager" in readme
    entry = json.loads((ROOT / "Resources" / "ExtensionsIndex" / "DSDSegmentation.json").read_text())
    # the catalog schema Slicer 5.10 ships is v1.0.1 (v1.0.2 came with 5.12); its properties, checked by hand
    assert entry["$schema"].endswith("/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert set(entry) <= {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies",
                          "build_subdirectory", "enabled", "tier"}
    assert 1 <= entry["tier"] <= 5


def test_factory_self_test_is_light() -> None:
    """The Extensions factory runs DSDSegmentationTest without torch: runTest returns after the light checks unless
    DSDSEG_FULL_SELFTEST=1, which only Testing/Slicer/run_selftest.py sets."""
    tree = ast.parse(MODULE.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DSDSegmentationTest"]
    (run,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "runTest"]
    src = ast.get_source_segment(MODULE.read_text(), run)
    gate = src.index('os.environ.get("DSDSEG_FULL_SELFTEST") != "1"')
    assert gate < src.index("test_segment_with_builtin_model") and gate < src.index("test_click_and_qa")
    assert "ensureDependencies" not in src.split("test_segment_with_builtin_model")[0]
    assert 'os.environ["DSDSEG_FULL_SELFTEST"] = "1"' in (ROOT / "Testing" / "Slicer" / "run_selftest.py").read_text()


def test_no_class_defines_a_method_twice() -> None:
    """A second ``def`` of the same name in a class silently replaces the first (the fine-tune panel's Stop button
    ran the module-close ``stop`` until session 11). Property setters/deleters are the one legitimate case."""
    files = [MODULE, *sorted((ROOT / "DSDSegmentation" / "DSDSegmentationLib").rglob("*.py")),
             *sorted((ROOT / "Testing").rglob("*.py"))]
    twice = []
    for f in files:
        for cls in (n for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ClassDef)):
            seen: set[str] = set()
            for fn in (n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
                accessor = any(isinstance(d, ast.Attribute) and d.attr in ("setter", "deleter") for d in fn.decorator_list)
                if fn.name in seen and not accessor:
                    twice.append(f"{f.relative_to(ROOT)}: {cls.name}.{fn.name}")
                seen.add(fn.name)
    assert not twice, twice


def test_the_module_file_never_imports_torch_or_monai() -> None:
    """Slicer's own process: importing torch there freezes the panel for seconds at the first action, loads CUDA's
    libraries beside Slicer's, and (with a CUDA build) triton after Mesa's libLLVM crashes it (session 11). The
    module asks the worker instead (its ``ready`` record: torch version, CUDA build, device)."""
    tree = ast.parse((ROOT / "DSDSegmentation" / "DSDSegmentation.py").read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not imported & {"torch", "monai"}, imported & {"torch", "monai"}


def test_widget_calls_no_protected_qt_method() -> None:
    """Methods that are protected in Qt's C++ (QAbstractItemView::selectedIndexes, ...) are not part of the API a
    widget made by Slicer's UI loader offers to Python; the public equivalents (QTableWidget::selectedItems,
    selectionModel().selectedRows()) are."""
    src = MODULE.read_text()
    for protected in ("selectedIndexes(", "viewOptions(", "visualRect(", "moveCursor(", "horizontalOffset(",
                      "verticalOffset(", "setSelection(", "visualRegionForSelection("):
        assert protected not in src, protected


# What Slicer 5.10's Python holds besides the standard library (SuperBuild/External_python-*.cmake and the Slicer/CTK
# Python packages at v5.10.0, checked there): a module may import these without asking. torch arrives through the
# PyTorch extension (PyTorchUtils, a module of that extension, is imported only after checking it is loaded).
SLICER_PROVIDES = {"numpy", "scipy", "vtk", "vtkmodules", "qt", "ctk", "slicer", "SimpleITK", "requests", "pip",
                   "PyTorchUtils", "torch"}
# import name -> distribution, where they differ
IMPORT_NAMES = {"nrrd": "pynrrd"}


def _python312() -> str | None:
    """A Python 3.12 interpreter on this machine (Slicer 5.10 ships 3.12.10), or None."""
    import shutil
    import subprocess

    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")),
                  *sorted(Path("/root/.pyenv/versions").glob("3.12*/bin/python3.12")), shutil.which("python3.12")]
    for c in filter(None, candidates):  # a pyenv shim may exist and answer "command not found"
        ok = subprocess.run([str(c), "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True)
        if ok.returncode == 0:
            return str(c)
    return None


def _python312_stdlib() -> set[str]:
    """``sys.stdlib_module_names`` of Python 3.12: a module removed in 3.12 (``imp``, ``distutils``, ``asynchat``) is
    missing there although this 3.11 test interpreter has it."""
    import subprocess
    import sys

    exe = _python312()
    if exe:
        out = subprocess.run([exe, "-c", "import sys; print(' '.join(sorted(sys.stdlib_module_names)))"],
                             capture_output=True, text=True, check=True)
        return set(out.stdout.split())
    # no 3.12 here: this interpreter's list less what 3.12 removed (PEP 594/632, What's New in Python 3.12)
    return set(sys.stdlib_module_names) - {"imp", "distutils", "asynchat", "asyncore", "smtpd"}


def test_sources_compile_on_python_3_12_without_warnings() -> None:
    """Slicer 5.10's Python 3.12 compiles every file of the extension without a warning (3.12 turned an invalid escape
    such as "\\d" in a plain string into a SyntaxWarning, printed in Slicer's console at every load)."""
    import subprocess

    exe = _python312()
    if exe is None:
        pytest.skip("no Python 3.12 on this machine (the project's machines have one under ~/.pyenv)")
    files = [str(f) for f in [MODULE, *sorted((ROOT / "DSDSegmentation" / "DSDSegmentationLib").rglob("*.py"))]]
    code = ("import sys\nfor f in sys.argv[1:]:\n    compile(open(f, encoding='utf-8').read(), f, 'exec')\n")
    out = subprocess.run([exe, "-W", "error", "-c", code, *files], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    bad = subprocess.run([exe, "-W", "error", "-c", code, "/dev/stdin"], input="x = '\\d'\n", capture_output=True, text=True)
    assert bad.returncode != 0 and "invalid escape sequence" in bad.stderr  # the check itself


def _guarded_by_import_error(tree: ast.AST, node: ast.AST) -> bool:
    for t in ast.walk(tree):
        if isinstance(t, ast.Try) and any(node is n for stmt in t.body for n in ast.walk(stmt)):
            for h in t.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if any(isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError") for n in names):
                    return True
    return False


def test_every_import_is_in_slicers_python_or_declared() -> None:
    """Every module the extension's code imports exists in Slicer 5.10's Python 3.12 standard library, ships with
    Slicer, is this package, or is declared in Resources/requirements.txt (what the panel installs with consent); an
    optional one (matplotlib for the CLI's report pictures) only inside ``try/except ImportError``. An undeclared
    import would work in CI's venv and fail in the user's Slicer."""
    stdlib = _python312_stdlib()
    assert "imp" not in stdlib and "json" in stdlib
    declared = {re.split(r"[<>=!~\[; ]", ln.strip(), maxsplit=1)[0].lower()
                for ln in (ROOT / "Resources" / "requirements.txt").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")}
    problems, optional = [], set()
    for f in [MODULE, *sorted((ROOT / "DSDSegmentation" / "DSDSegmentationLib").rglob("*.py"))]:
        tree = ast.parse(f.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            for name in names:
                if name in stdlib or name in SLICER_PROVIDES or name in ("DSDSegmentationLib", "__future__"):
                    continue
                if IMPORT_NAMES.get(name, name).lower() in declared:
                    continue
                if _guarded_by_import_error(tree, node):
                    optional.add(name)
                    continue
                problems.append(f"{f.relative_to(ROOT)}:{node.lineno} imports {name}, which Slicer 5.10 lacks")
    assert not problems, problems
    assert optional <= {"matplotlib", "packaging"}, optional  # packaging: pip's vendored copy is the fallback
    # the check itself: an undeclared import is caught
    assert "yaml" not in stdlib and "yaml" not in declared


# Slicer 5.10's parameter-node GUI connectors (Base/Python/slicer/parameterNodeWrapper/guiConnectors.py at v5.10.0,
# read there): which field types each widget class can be bound to. The match is on the exact widget class
# (``type(widget) == ...``); a binding no connector represents raises "Unable to create GUI connector" in connectGui,
# i.e. the panel would not open at all.
GUI_CONNECTORS_V5_10 = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton", "QComboBox", "ctkComboBox"},
    "int": {"QSlider", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
            "ctkDoubleSpinBox", "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox", "QComboBox", "ctkComboBox"},
    "str": {"QComboBox", "ctkComboBox", "QLineEdit", "QLabel", "QTextEdit"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
}


def _field_types() -> dict[str, str]:
    """Each parameter node field's unannotated type: int, Path, vtkMRMLScalarVolumeNode, ..."""
    out = {}
    for n in _parameter_node_fields():
        ann = n.annotation
        if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
            ann = ann.slice.elts[0]  # type: ignore[attr-defined]
        out[n.target.id] = ann.id if isinstance(ann, ast.Name) else ast.unparse(ann)
    return out


def test_every_binding_has_a_gui_connector_in_slicer_5_10() -> None:
    types = _field_types()
    assert types["inputVolume0"] == "vtkMRMLScalarVolumeNode" and types["finetuneEpochs"] == "int"
    assert types["finetuneFolder"] == "Path"
    bound = 0
    for name, w in ui_widgets().items():
        field = _bound_field(w)
        if field is None:
            continue
        bound += 1
        kind = "node" if types[field].startswith("vtkMRML") else types[field]
        assert kind in GUI_CONNECTORS_V5_10, f"{field}: type {kind} has no GUI connector in Slicer 5.10"
        assert w.get("class") in GUI_CONNECTORS_V5_10[kind], (
            f"{name} ({w.get('class')}) bound to {field} ({kind}): no connector in Slicer 5.10 represents it")
        if w.get("class") == "QSlider":
            assert "WithinRange" in _field_annotations()[field], "a QSlider bound to an unbounded int raises in 5.10"
        if w.get("class") == "qMRMLNodeComboBox":
            # the connector sets the selector's nodeTypes to the field's class, whatever the .ui lists (and leaves
            # noneEnabled, so "(create new segmentation)" stays): the two must say the same
            ui_types = "".join(next(p for p in w.findall("property") if p.get("name") == "nodeTypes").itertext()).split()
            assert ui_types == [types[field]], (name, ui_types, types[field])
    assert bound >= 15
