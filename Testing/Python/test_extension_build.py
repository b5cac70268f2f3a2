"""The extension builds and installs with real CMake against a stand-in for Slicer's CMake package
(``Testing/CMake/SlicerStandIn``: Slicer's documented scripted-module and CTK script-copying rules), and the
installed module tree holds exactly what the module loads at run time."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STANDIN = ROOT / "Testing" / "CMake" / "SlicerStandIn"
MODULES_DIR = "lib/Slicer-5.10/qt-scripted-modules"
NOT_SHIPPED = ("Resources/ExtensionsIndex/", "Resources/Screenshots/")


def _tool(name: str) -> str:
    for candidate in (Path(sys.executable).parent / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} is part of the test install (.ci/setup: pip install cmake ninja)")


def _python_hints() -> list[str]:
    """What Slicer's build tree gives PythonInterp / PythonLibs: the interpreter, its headers and library."""
    import sysconfig

    lib = Path(sysconfig.get_config_var("LIBDIR") or "") / (sysconfig.get_config_var("LDLIBRARY") or "")
    return [f"-DPYTHON_EXECUTABLE={sys.executable}", f"-DPYTHON_INCLUDE_DIR={sysconfig.get_paths()['include']}",
            f"-DPYTHON_LIBRARY={lib}"]


def _build(source: Path, work: Path) -> subprocess.CompletedProcess:
    cmake = _tool("cmake")
    env = {**os.environ, "PATH": f"{Path(_tool('ninja')).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    steps = [[cmake, "-S", str(source), "-B", str(work / "build"), "-G", "Ninja", f"-DSlicer_DIR={STANDIN}",
              f"-DCMAKE_INSTALL_PREFIX={work / 'prefix'}", f"-DPython3_EXECUTABLE={sys.executable}", *_python_hints()],
             [cmake, "--build", str(work / "build")],
             [cmake, "--install", str(work / "build")]]
    for step in steps:
        r = subprocess.run(step, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            return r
    return r


def _tracked() -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail("the build check compares the install tree with git's file list")
    return [f for f in out.stdout.splitlines() if (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("extension-build")
    r = _build(ROOT, work)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work


def test_install_tree_holds_exactly_what_the_module_loads(installed: Path) -> None:
    tree = installed / "prefix" / MODULES_DIR
    got = {str(p.relative_to(tree)) for p in tree.rglob("*")
           if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    files = _tracked()
    expected = {"DSDSegmentation.py"}
    expected |= {f.removeprefix("DSDSegmentation/") for f in files
                 if f.startswith("DSDSegmentation/DSDSegmentationLib/") and f.endswith((".py", ".json"))}
    expected |= {f for f in files if f.startswith("Resources/") and not f.startswith(NOT_SHIPPED)}
    assert not [f for f in got if f.endswith(".json.py")], "a data file went through the script rule"
    assert got - expected == set(), f"shipped but not part of the module: {sorted(got - expected)}"
    assert expected - got == set(), f"missing from the install tree: {sorted(expected - got)}"
    for must in ("Resources/UI/DSDSegmentation.ui", "Resources/Icons/DSDSegmentation.png",
                 "Resources/Terminology/DSDSegmentation.term.json", "Resources/requirements.txt",
                 "DSDSegmentationLib/engine/presets/hippocampus.json",
                 "Resources/Models/hippocampus-dsd/weights.pt", "Resources/SampleData/Hippocampus/dataset.json"):
        assert must in got
    assert (tree / "DSDSegmentationLib" / "worker" / "cli.pyc").is_file(), "scripts are byte-compiled (CTK: beside "\
        "each script) in the build tree and installed with it"


def test_installed_module_finds_its_resources_without_the_repository(installed: Path) -> None:
    """The installed Lib package, imported ahead of the repository, finds presets, models, terminology and UI."""
    tree = installed / "prefix" / MODULES_DIR
    code = (f"import sys; sys.path.insert(0, {str(tree)!r})\n"
            "import json, DSDSegmentationLib\n"
            "from DSDSegmentationLib.engine.cards import list_models, resources_dir\n"
            "from DSDSegmentationLib.engine.tasks import builtin_presets, load_preset\n"
            "print(json.dumps({'lib': DSDSegmentationLib.__file__, 'resources': str(resources_dir()),"
            " 'presets': builtin_presets(), 'models': {m['id']: m['status'] for m in list_models()},"
            " 'tumour': load_preset('brain_tumour').label_values}))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=installed,
                       env={**os.environ, "DSDSEG_MODELS": str(installed / "no-user-models")})
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["lib"].startswith(str(tree)) and info["resources"] == str(tree / "Resources")
    assert {"hippocampus", "cardiac", "brain_tumour", "brain_tumour_2seq"} <= set(info["presets"])
    assert info["models"] and all(s == "ok" for s in info["models"].values()), info["models"]
    assert info["tumour"] == [0, 1, 2, 4]


def test_extension_description_has_the_catalog_metadata(installed: Path) -> None:
    s4ext = (installed / "build" / "DSDSegmentation.s4ext").read_text()
    fields = dict(line.split(" ", 1) for line in s4ext.splitlines() if " " in line)
    assert fields["depends"] == "PyTorch" and fields["modules"] == "DSDSegmentation"
    urls = fields["screenshoturls"].split()
    assert len(urls) >= 2
    prefix = "https://raw.githubusercontent.com/dsdsegmentation/SlicerDSDSegmentation/main/"
    for url in urls + [fields["iconurl"]]:
        assert url.startswith(prefix) and (ROOT / url[len(prefix):]).is_file(), f"{url} is not a committed file"
    for person in fields["contributors"].split(", "):
        assert person.endswith(")") and " (" in person, f"contributor '{person}' is not 'Name (Organisation)'"


def test_standin_encodes_ctks_script_rule(tmp_path: Path) -> None:
    """The defect the build check exists for: a non-Python file listed in SCRIPTS becomes '<name>.json.py' and the
    build stops; the same file in RESOURCES is copied unchanged."""
    ext = tmp_path / "ext"
    (ext / "Mod" / "ModLib").mkdir(parents=True)
    (ext / "Mod" / "Mod.py").write_text("x = 1\n")
    (ext / "Mod" / "ModLib" / "data.json").write_text("{}\n")
    (ext / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.20.6...3.22.6)\nproject(Ext NONE)\n"
        + "".join(f'set(EXTENSION_{k} "x (y)")\n' for k in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"))
        + "find_package(Slicer REQUIRED)\ninclude(${Slicer_USE_FILE})\nadd_subdirectory(Mod)\n"
          "include(${Slicer_EXTENSION_GENERATE_CONFIG})\n")
    (ext / "Mod" / "CMakeLists.txt").write_text("slicerMacroBuildScriptedModule(NAME Mod SCRIPTS Mod.py ModLib/data.json)\n")
    r = _build(ext, tmp_path / "bad")
    assert r.returncode != 0 and "ModLib/data.json.py" in r.stdout + r.stderr
    (ext / "Mod" / "CMakeLists.txt").write_text(
        "slicerMacroBuildScriptedModule(NAME Mod SCRIPTS Mod.py RESOURCES ModLib/data.json)\n")
    r = _build(ext, tmp_path / "good")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert (tmp_path / "good" / "prefix" / MODULES_DIR / "ModLib" / "data.json").read_text() == "{}\n"


def test_a_policy_range_past_cmake_3_26_cannot_find_slicers_python(tmp_path: Path) -> None:
    """Slicer's SlicerConfig.cmake calls find_package(PythonInterp) / find_package(PythonLibs) in the extension's
    policy scope: with a cmake_minimum_required() range reaching 3.27 (CMP0148 NEW) a CMake >= 3.27 provides
    neither module and configuring fails (seen with Slicer 5.10's real macros and this repository's old range
    3.16.3...3.28 in session 11); Slicer's template range 3.20.6...3.22.6 configures."""
    cmake = _tool("cmake")
    version = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout.split()[2]
    if tuple(int(v) for v in version.split(".")[:2]) < (3, 27):
        pytest.skip(f"CMake {version} predates policy CMP0148")
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in (ROOT / "CMakeLists.txt").read_text()
    ext = tmp_path / "ext"
    ext.mkdir()
    for name, rng in (("late", "3.16.3...3.28"), ("template", "3.20.6...3.22.6")):
        (ext / "CMakeLists.txt").write_text(f"cmake_minimum_required(VERSION {rng})\nproject(Ext)\nfind_package(Slicer REQUIRED)\n")
        r = subprocess.run([cmake, "-S", str(ext), "-B", str(tmp_path / name), f"-DSlicer_DIR={STANDIN}", *_python_hints()],
                           capture_output=True, text=True, timeout=300)
        if name == "late":
            assert r.returncode != 0 and "PythonLibs" in r.stdout + r.stderr
        else:
            assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
