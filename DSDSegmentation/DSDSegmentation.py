"""DSDSegmentation Slicer module (widget room).

The panel, its parameter node and the MRML Logic arrive with the Slicer-module issue; the engine and the
``dsdseg`` worker/CLI it will call live in ``DSDSegmentationLib``.
"""

from slicer.ScriptedLoadableModule import ScriptedLoadableModule


class DSDSegmentation(ScriptedLoadableModule):
    """Module registration: title, category and credits shown by Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "DSDSegmentation"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["DSDSegmentation developers"]
        self.parent.helpText = (
            "Segment hippocampus, cardiac and brain-tumour MRI with dual self-distillation (DSD) U-shaped networks."
        )
        self.parent.acknowledgementText = (
            "DSD: Banerjee et al., IEEE TBME 2025 (arXiv 2306.03271). Networks from MONAI."
        )
