"""A real MRML scene without the Slicer application (slicer-core, no Qt): the module logics the bridge needs.

Used by the demo and the tests; inside Slicer the application provides all of this."""

from __future__ import annotations

import os
import types

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import slicer  # noqa: E402
from vtkmodules.vtkCommonCore import vtkCollection  # noqa: E402


class _Module:
    def __init__(self, logic):
        self._logic = logic

    def logic(self):
        return self._logic


def setup_headless():
    """Scene + application logic + Colors, Volumes, SubjectHierarchy, Segmentations and Sequences logics."""
    scene = slicer.vtkMRMLScene()
    app = slicer.vtkSlicerApplicationLogic()
    app.SetMRMLScene(scene)
    colors = app.GetColorLogic()
    colors.SetMRMLScene(scene)
    colors.AddDefaultColorNodes()
    app.SetModuleLogic("Colors", colors)
    app.SetSliceLogics(vtkCollection())
    app.SetViewLogics(vtkCollection())
    mods = {}
    for key, name, cls in (("volumes", "Volumes", slicer.vtkSlicerVolumesLogic),
                           ("subjecthierarchy", "SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                           ("segmentations", "Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                           ("sequences", "Sequences", slicer.vtkSlicerSequencesLogic)):
        logic = cls()
        logic.SetMRMLScene(scene)
        logic.SetMRMLApplicationLogic(app)
        app.SetModuleLogic(name, logic)
        mods[key] = logic
    for cls in ("vtkMRMLInteractionNode", "vtkMRMLSelectionNode"):  # the application creates these in Slicer
        if scene.GetFirstNodeByClass(cls) is None:
            node = scene.CreateNodeByClass(cls)
            node.SetSingletonTag("Singleton")
            scene.AddNode(node)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{k: _Module(v) for k, v in mods.items()})
    # the module logics hold the application logic by a plain pointer (Sequences calls it on every browser change):
    # it must live as long as they do, whether or not the caller keeps it
    slicer.modules.application_logic = app
    return scene, app, mods


def read_mrb(scene, app, path, cache_dir) -> bool:
    """Load a Slicer scene bundle (``.mrb``) into ``scene``; needs the data-IO managers Slicer normally provides."""
    remote = slicer.vtkMRMLRemoteIOLogic()
    remote.SetMRMLScene(scene)
    remote.SetMRMLApplicationLogic(app)
    remote.GetCacheManager().SetRemoteCacheDirectory(str(cache_dir))
    data_io = slicer.vtkDataIOManagerLogic()
    data_io.SetMRMLScene(scene)
    data_io.SetMRMLApplicationLogic(app)
    data_io.SetAndObserveDataIOManager(remote.GetDataIOManager())
    remote.AddDataIOToScene()
    return bool(scene.ReadFromMRB(str(path)))
