"""What the module must install into Slicer's Python before first use, decided without Qt and without installing.

Versions are read from package metadata (never by importing: an imported package cannot be replaced without a
restart). torch comes only from the PyTorch extension (PyTorch Utils); Slicer's own packages are never replaced.
The panel shows :func:`describe` and asks before anything is installed.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - Slicer's Python always has pip, which vendors packaging
    from pip._vendor.packaging.requirements import Requirement  # type: ignore[no-redef]
    from pip._vendor.packaging.version import InvalidVersion, Version  # type: ignore[no-redef]

# MONAI 1.6.1 (pinned in Resources/requirements.txt) declares torch>=2.8.0; a test keeps the two in step
TORCH_REQUIREMENT = ">=2.8"
# Slicer ships these and its own code depends on them: the extension never installs or replaces them
SLICER_OWNED = frozenset({"numpy", "simpleitk", "vtk", "requests", "torch", "torchvision", "pip", "setuptools", "qt",
                          "ctk", "slicer"})
# pinned at their installed versions while pip installs ours: a dependency that would need another version of one of
# them (e.g. a scipy wanting a newer numpy) makes pip stop with a conflict instead of replacing Slicer's copy
PINNED_DURING_INSTALL = ("numpy", "SimpleITK", "vtk", "requests", "torch", "torchvision")
MIN_SLICER = (5, 10)
MIN_PYTHON = (3, 10)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


@dataclass
class Action:
    requirement: str
    name: str
    installed: str | None
    reason: str  # "not installed" or "installed X does not satisfy Y"
    imported: bool  # already imported in this process: replacing it needs a Slicer restart


def read_requirements(lines: Iterable[str]) -> list[str]:
    return [ln.split("#", 1)[0].strip() for ln in lines if ln.split("#", 1)[0].strip()]


def plan(requirements: Iterable[str], version_of: Callable[[str], str | None] = installed_version,
         modules: dict | None = None) -> list[Action]:
    """The requirements that are missing or whose installed version does not satisfy them."""
    modules = sys.modules if modules is None else modules
    actions = []
    for text in requirements:
        req = Requirement(text)
        if _canonical(req.name) in SLICER_OWNED:
            raise ValueError(f"{req.name} is Slicer's own package (or torch, which comes from PyTorch Utils); "
                             "the extension must not install it")
        have = version_of(req.name)
        if have is None:
            actions.append(Action(text, req.name, None, "not installed", False))
            continue
        try:
            ok = req.specifier.contains(Version(have), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            module = req.name.replace("-", "_").lower()
            actions.append(Action(text, req.name, have, f"installed {have} does not satisfy {req.specifier}",
                                  module in modules))
    return actions


def install_arguments(actions: list[Action], folder: str | Path,
                      version_of: Callable[[str], str | None] = installed_version) -> list[str]:
    """``pip install`` arguments for ``actions`` (``slicer.util.pip_install`` takes the list): the requirements, and
    a constraints file written into ``folder`` that holds every package of Slicer's own (and torch) at the version
    installed now, so that pip can never upgrade or downgrade them as a dependency of ours."""
    pins = [f"{name}=={version_of(name)}" for name in PINNED_DURING_INSTALL if version_of(name)]
    constraints = Path(folder) / "slicer-constraints.txt"
    constraints.write_text("# Slicer's own packages, as installed: never replaced by DSDSegmentation\n"
                           + "".join(f"{p}\n" for p in pins), encoding="utf-8")
    return ["--constraint", str(constraints), *(a.requirement for a in actions)]


def torch_problem(version_of: Callable[[str], str | None] = installed_version) -> str | None:
    """None when torch satisfies MONAI's minimum, else what is wrong (to pass to PyTorch Utils)."""
    have = version_of("torch")
    if have is None:
        return "torch is not installed"
    try:
        if Version(have.split("+")[0]) in Requirement(f"torch{TORCH_REQUIREMENT}").specifier:
            return None
    except InvalidVersion:
        pass
    return f"torch {have} is installed; MONAI needs torch{TORCH_REQUIREMENT}"


def describe(actions: list[Action]) -> str:
    """The consent text: what will be installed and why, and whether Slicer must restart afterwards."""
    lines = [f"• {a.requirement} ({a.reason})" for a in actions]
    text = "DSDSegmentation needs these Python packages in Slicer's Python:\n" + "\n".join(lines)
    if any(a.imported for a in actions):
        text += "\n\nSome of them are already loaded: restart Slicer after the installation."
    return text + "\n\nSlicer's own packages (numpy, SimpleITK, vtk, requests) are not changed. Install now?"


def slicer_version_problem(major: int, minor: int, python: tuple[int, int] = tuple(sys.version_info[:2])) -> str | None:
    """A message for a Slicer older than the supported range, else None."""
    if (major, minor) < MIN_SLICER or python < MIN_PYTHON:
        return (f"DSDSegmentation needs Slicer {MIN_SLICER[0]}.{MIN_SLICER[1]} or newer (Python "
                f"{MIN_PYTHON[0]}.{MIN_PYTHON[1]}+); this is Slicer {major}.{minor} with Python "
                f"{python[0]}.{python[1]}. Please install a current Slicer from download.slicer.org.")
    return None
