"""Segment terminology tags through the API every supported Slicer has.

``vtkSegment.SetTerminology`` / ``GetTerminology`` and the Terminologies logic's ``IsTerminologyContextLoaded``
are recent conveniences. The tag they read and write (named by ``vtkSegment.GetTerminologyEntryTagName()``) and
``SetTag`` / ``GetTag`` / ``GetLoadedTerminologyNames`` exist in every Slicer we support, so the bridge uses only
these, in one place.
"""

from __future__ import annotations

from typing import Any

import vtk


def set_segment_terminology(segment: Any, tag: str) -> None:
    """Write a terminology entry (Slicer's ``context~category~type~...`` serialisation) on a segment."""
    segment.SetTag(segment.GetTerminologyEntryTagName(), tag)


def get_segment_terminology(segment: Any) -> str:
    """The segment's terminology entry, or "" when it has none."""
    value = vtk.reference("")
    if not segment.GetTag(segment.GetTerminologyEntryTagName(), value):
        return ""
    return str(value)


def loaded_terminology_names(terminologies_logic: Any) -> list[str]:
    names = vtk.vtkStringArray()
    terminologies_logic.GetLoadedTerminologyNames(names)
    return [names.GetValue(i) for i in range(names.GetNumberOfValues())]


def load_terminology_context(terminologies_logic: Any) -> str:
    """Load the project's custom terminology context (every segment type our models produce, with its codes and
    colours) into Slicer's Terminologies logic once; returns its name. Called when Slicer's startup completes and
    again when the panel opens (a module loaded after startup never sees ``startupCompleted``)."""
    from ..engine.cards import resources_dir
    from ..engine.errors import InputError
    from ..engine.terminology import CONTEXT_NAME

    if CONTEXT_NAME in loaded_terminology_names(terminologies_logic):
        return CONTEXT_NAME
    path = resources_dir() / "Terminology" / "DSDSegmentation.term.json"
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if name != CONTEXT_NAME:
        raise InputError(f"could not load the terminology context {path}")
    return name
