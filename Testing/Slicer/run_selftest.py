"""Run the module's self-test in a real Slicer (5.10+), from the repository root:

    Slicer --no-splash --no-main-window --testing --additional-module-paths DSDSegmentation \
        --python-script Testing/Slicer/run_selftest.py

Needs the PyTorch extension (PyTorch Utils) or lets the module install torch on first use; MONAI and the rest are
installed by the module's dependency check. Exits 0 when every test passed, 1 otherwise.
"""

import os
import sys
import traceback

import slicer

os.environ["DSDSEG_FULL_SELFTEST"] = "1"  # the inference tests too (the factory's generic test runs the light part)

try:
    import DSDSegmentation

    DSDSegmentation.DSDSegmentationTest().runTest()
except Exception:  # noqa: BLE001
    traceback.print_exc()
    slicer.app.exit(1)
    sys.exit(1)
slicer.app.exit(0)
