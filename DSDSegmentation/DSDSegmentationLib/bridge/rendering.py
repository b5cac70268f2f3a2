"""Offscreen PNG renders of MRML views with Slicer's own displayable managers (no Qt): a 3D view of a
segmentation's surfaces and a 2D slice with segment outlines over the volume. Used headless (demo, QA reports,
tests); inside Slicer the module shows the real views instead."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import slicer
import vtk

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


_views = itertools.count(1)


def _register(factory: Any, names: tuple[str, ...], app_logic: Any) -> None:
    factory.SetMRMLApplicationLogic(app_logic)
    for dm in names:
        if not factory.IsDisplayableManagerRegistered(dm):
            factory.RegisterDisplayableManager(dm)


def _write_png(window: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    grab = vtk.vtkWindowToImageFilter()
    grab.SetInput(window)
    grab.ReadFrontBufferOff()
    grab.Update()
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputConnection(grab.GetOutputPort())
    writer.Write()
    return path


def render_3d(scene: Any, app_logic: Any, segmentation_node: Any, path: str | Path, size: tuple[int, int] = (600, 480),
              view_id: str | None = None) -> Path:
    """PNG of the segmentation's closed surfaces in a 3D view."""
    factory = slicer.vtkMRMLThreeDViewDisplayableManagerFactory.GetInstance()
    _register(factory, ("vtkMRMLCameraDisplayableManager", "vtkMRMLViewDisplayableManager",
                        "vtkMRMLModelDisplayableManager", "vtkMRMLSegmentationsDisplayableManager3D"), app_logic)
    renderer = vtk.vtkRenderer()
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.AddRenderer(renderer)
    vtk.vtkRenderWindowInteractor().SetRenderWindow(window)
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, renderer)
    view_logic = slicer.vtkMRMLViewLogic()
    view_logic.SetMRMLApplicationLogic(app_logic)
    view_logic.SetMRMLScene(scene)
    view_node = view_logic.AddViewNode(view_id or f"DSDView{next(_views)}")  # a fresh view per render
    group.SetMRMLDisplayableNode(view_node)
    segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.GetDisplayNode().SetVisibility3D(True)
    renderer.ResetCamera()
    renderer.GetActiveCamera().Azimuth(30)
    renderer.GetActiveCamera().Elevation(20)
    renderer.ResetCameraClippingRange()
    window.Render()
    out = _write_png(window, Path(path))
    window.Finalize()
    return out


def render_slice(scene: Any, app_logic: Any, volume_node: Any, segmentation_node: Any, path: str | Path,
                 orientation: str = "Axial", offset: float | None = None, size: tuple[int, int] = (600, 600),
                 layout_name: str | None = None) -> Path:
    """PNG of one slice of ``volume_node`` with the segments as outlines and a light fill.

    ``offset``: slice position in mm along the view normal; default: the centre of the first segment.
    """
    factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
    _register(factory, ("vtkMRMLSegmentationsDisplayableManager2D",), app_logic)
    slice_logic = slicer.vtkMRMLSliceLogic()
    slice_logic.SetMRMLApplicationLogic(app_logic)
    slice_logic.SetMRMLScene(scene)
    slice_node = slice_logic.AddSliceNode(layout_name or f"DSDSlice{next(_views)}")  # a fresh slice view per render
    slice_node.SetOrientation(orientation)
    slice_logic.GetSliceCompositeNode().SetBackgroundVolumeID(volume_node.GetID())
    slice_logic.ResizeSliceNode(*size)
    slice_logic.FitSliceToBackground()
    if offset is None:
        segmentation = segmentation_node.GetSegmentation()
        center = segmentation_node.GetSegmentCenterRAS(segmentation.GetNthSegmentID(0))
        normal = [slice_node.GetSliceToRAS().GetElement(i, 2) for i in range(3)]
        offset = sum(c * n for c, n in zip(center, normal))
    slice_logic.SetSliceOffset(offset)
    display = segmentation_node.GetDisplayNode()
    display.SetVisibility2DFill(True)
    display.SetVisibility2DOutline(True)
    display.SetOpacity2DFill(0.25)
    display.SetSliceIntersectionThickness(2)
    # the slice image is drawn in its own renderer (layer 0) under the segment layer (layer 1)
    window = vtk.vtkRenderWindow()
    window.SetOffScreenRendering(1)
    window.SetSize(*size)
    window.SetNumberOfLayers(2)
    image_renderer, dm_renderer = vtk.vtkRenderer(), vtk.vtkRenderer()
    image_renderer.SetLayer(0)
    dm_renderer.SetLayer(1)
    window.AddRenderer(image_renderer)
    window.AddRenderer(dm_renderer)
    vtk.vtkRenderWindowInteractor().SetRenderWindow(window)
    mapper = vtk.vtkImageMapper()
    mapper.SetInputConnection(slice_logic.GetImageDataConnection())
    mapper.SetColorWindow(255)
    mapper.SetColorLevel(127.5)
    actor = vtk.vtkActor2D()
    actor.SetMapper(mapper)
    image_renderer.AddViewProp(actor)
    dm_renderer.GetActiveCamera().ParallelProjectionOn()
    group = slicer.vtkMRMLDisplayableManagerGroup()
    group.Initialize(factory, dm_renderer)
    group.SetMRMLDisplayableNode(slice_node)
    window.Render()
    out = _write_png(window, Path(path))
    window.Finalize()
    return out
