"""DSDSegmentation: the engine (``engine``), the worker/CLI (``cli``, ``process``) and the MRML bridge (``logic``)."""

__version__ = "0.1.0"
