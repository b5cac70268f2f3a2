"""Progress reporting: a tqdm bar for people, one JSON object per line for machines (the Slicer worker)."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterator, TextIO


class Progress:
    """``update(stage, done, total, message, **extra)``; ``mode`` is ``bar``, ``json`` or ``none``."""

    def __init__(self, mode: str = "bar", stream: TextIO | None = None):
        if mode not in ("bar", "json", "none"):
            raise ValueError(f"progress mode must be bar, json or none, got {mode!r}")
        self.mode = mode
        self.stream = stream or (sys.stdout if mode == "json" else sys.stderr)
        self._bars: dict[str, Any] = {}

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        if self.mode == "json":
            rec = {"stage": stage, "done": int(done), "total": int(total), "message": message, **extra}
            self.stream.write(json.dumps(rec, default=float) + "\n")
            self.stream.flush()
        elif self.mode == "bar":
            from tqdm import tqdm

            bar = self._bars.get(stage)
            if bar is None or bar.total != total:
                if bar is not None:
                    bar.close()
                bar = self._bars[stage] = tqdm(total=total, desc=stage, file=self.stream, leave=True)
            bar.n = done
            if message:
                bar.set_postfix_str(message, refresh=False)
            bar.refresh()
            if done >= total:
                bar.close()
                self._bars.pop(stage, None)

    def log(self, message: str, json_record: bool = True) -> None:
        """A free-text line (stage ``log`` in JSON mode, unless ``json_record`` is False)."""
        if self.mode == "json":
            if json_record:
                self.update("log", 0, 0, message)
        elif self.mode == "bar":
            from tqdm import tqdm

            tqdm.write(message, file=self.stream)

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


class CasesOnly:
    """Wraps a progress for a run over many cases: passes the per-case bar ("cases") and free-text lines, drops the
    bars inside each case, so that a panel shows one bar from the first case to the last instead of one per case."""

    def __init__(self, inner: Any, keep: tuple[str, ...] = ("cases", "log")):
        self.inner, self.keep = inner, keep

    def update(self, stage: str, done: int, total: int, message: str = "", **extra: Any) -> None:
        if stage in self.keep:
            self.inner.update(stage, done, total, message, **extra)

    def log(self, message: str, json_record: bool = True) -> None:
        self.inner.log(message, json_record)

    def close(self) -> None:
        self.inner.close()


@contextmanager
def only_stages(holder: Any, keep: tuple[str, ...] = ("cases", "log")) -> Iterator[Any]:
    """While the block runs over many cases, ``holder.progress`` (a predictor's) passes only the ``keep`` stages; the
    block gets the original progress for its own per-case bar, which is put back afterwards."""
    progress = holder.progress
    holder.progress = CasesOnly(progress, keep)
    try:
        yield progress
    finally:
        holder.progress = progress
