"""DSDSegmentation: the engine (``engine``), the worker/CLI (``cli``), and later the MRML bridge (Logic)."""

__version__ = "0.1.0"
