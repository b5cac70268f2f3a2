"""MRML bridge room: Qt-free logic and panel controllers on MRML only (``slicer`` MRML classes, ``vtk``).

Runs inside Slicer and headless on a real MRML scene from ``slicer-core``. May import the engine's torch-free
parts (cards, errors, terminology) and the worker client (``worker.process``); never ``qt`` and never torch."""
