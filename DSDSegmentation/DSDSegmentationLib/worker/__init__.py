"""Worker / CLI room: ``dsdseg`` (one-shot commands and the warm ``serve`` worker) and its client (``process``).

May import the engine; never ``slicer``, ``qt`` or MRML (``qa_report`` uses plain VTK for offscreen renders)."""
