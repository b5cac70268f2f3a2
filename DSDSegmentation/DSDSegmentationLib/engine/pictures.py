"""matplotlib for the pictures a run or a report writes (training curves, outline pictures), where it exists."""

from __future__ import annotations

from typing import Any


def offscreen_pyplot() -> Any:
    """matplotlib's pyplot on its off-screen backend, or None where matplotlib is not installed (Slicer's Python has
    none and the extension does not install it: the runs and reports are complete without their pictures)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt
