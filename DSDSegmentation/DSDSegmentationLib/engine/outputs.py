"""Output safety: checked before any work starts, so nothing a user had is overwritten and no minutes of
inference end in a traceback because an output cannot be written.

Rules (each refusal is an :class:`InputError` naming the path and the reason):

- an output never resolves to an input or to another output (through ``..``, symlinks or hard links);
- an output has a supported extension and is not an existing folder;
- an existing output file is replaced only with ``overwrite``;
- the output's folder exists (or can be created) and is writable;
- a batch never writes into a folder that holds one of its inputs unless the user allows it, and even then
  never over an input file;
- a report folder (evaluate, qa) that already holds files of the report's names is written only with
  ``overwrite``, and never over an input.

Files are written atomically (a temporary file in the same folder, then a rename) with the permissions the
user's umask gives a new file, not the 0600 of a temporary file.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import InputError

LABEL_SUFFIXES = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd")


def _key(path: str | Path) -> tuple:
    """What identifies a file: (device, inode) when it exists, else its resolved path."""
    p = Path(path)
    try:
        st = p.stat()
        return ("inode", st.st_dev, st.st_ino)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(p)))


def same_file(a: str | Path, b: str | Path) -> bool:
    return _key(a) == _key(b) or os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))


def has_suffix(path: str | Path, suffixes: Iterable[str]) -> bool:
    return str(path).lower().endswith(tuple(suffixes))


def _nearest_existing(folder: Path) -> Path:
    p = folder.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable_folder(folder: str | Path, what: str) -> None:
    """The folder exists or can be created, is a folder, and a file can be created in it (tried, then removed)."""
    folder = Path(folder)
    base = _nearest_existing(folder)
    if not base.is_dir():
        raise InputError(f"{what}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise InputError(f"{what}: the folder {base} is not writable")
    if folder.is_dir():
        try:
            fd, tmp = tempfile.mkstemp(prefix=".dsdseg-write-test-", dir=folder)
            os.close(fd)
            os.remove(tmp)
        except OSError as e:
            raise InputError(f"{what}: cannot write into {folder}: {e.strerror or e}") from e


def check_output_file(output: str | Path, inputs: Iterable[str | Path] = (), others: Iterable[str | Path] = (),
                      overwrite: bool = False, suffixes: Iterable[str] = LABEL_SUFFIXES, what: str = "output") -> Path:
    """Refuse an output file that would destroy an input, clash with another output, cannot be written in the
    requested format, or exists (unless ``overwrite``). Returns the output as a Path."""
    out = Path(output)
    suffixes = tuple(suffixes)
    for p in inputs:
        if same_file(out, p):
            raise InputError(f"{what} {out} is the input file {p}: refusing to overwrite an input; choose another "
                             f"output name")
    for p in others:
        if p is not None and same_file(out, p):
            raise InputError(f"{what} {out} is also another output ({p}): give each output its own file")
    if out.is_dir():
        raise InputError(f"{what} {out} is an existing folder; give a file name ending in {', '.join(suffixes)}")
    if not has_suffix(out, suffixes):
        raise InputError(f"{what} {out}: unsupported file type; the name must end in {', '.join(suffixes)}")
    if out.exists() and not overwrite:
        raise InputError(f"{what} {out} already exists; pass --overwrite to replace it, or choose another name")
    check_writable_folder(out.parent if str(out.parent) else Path("."), what)
    return out


def check_output_folder(folder: str | Path, inputs: Iterable[str | Path], allow_input_folder: bool = False,
                        what: str = "--output-dir") -> Path:
    """A batch output folder: writable, not a file, and not a folder that holds one of the inputs unless allowed."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file, not a folder")
    if not allow_input_folder:
        target = _key(folder) if folder.exists() else ("path", os.path.normcase(os.path.realpath(folder)))
        for p in inputs:
            parent = Path(p).parent
            if parent.exists() and (_key(parent) == target or same_file(parent, folder)):
                raise InputError(f"{what} {folder} holds the input {p}: writing results next to the inputs can replace "
                                 f"them; choose another folder (or pass --allow-input-folder; inputs are still never "
                                 f"overwritten)")
    check_writable_folder(folder, what)
    return folder


def check_report_folder(folder: str | Path, files: Iterable[str], inputs: Iterable[str | Path | None] = (),
                        overwrite: bool = False, what: str = "--output") -> Path:
    """A report folder: not a file, writable, none of the report's ``files`` (names relative to the folder) is an
    input, and files already there under those names (an earlier report, or the user's own) are replaced only with
    ``overwrite``. Checked before any work starts; the refusal names every file concerned."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what} {folder} is a file; the report needs a folder")
    targets = [folder / f for f in files]
    for t in targets:
        for p in inputs:
            if p is not None and Path(p).exists() and same_file(t, p):
                raise InputError(f"{what} {folder}: the report's {t.relative_to(folder)} would overwrite the input {p}; "
                                 f"choose another report folder")
    existing = [str(t.relative_to(folder)) for t in targets if t.exists()]
    if existing and not overwrite:
        raise InputError(f"{what} {folder} already holds {', '.join(existing)}; pass --overwrite to replace "
                         f"{'it' if len(existing) == 1 else 'them'}, or choose another report folder")
    check_writable_folder(folder, what)
    return folder


def atomic_write_text(path: str | Path, text: str | bytes) -> None:
    """Text (UTF-8) or bytes to a temporary file in the same folder, then rename: never a partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with (os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8")) as f:
            f.write(text)
        apply_umask(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def apply_umask(path: str | Path) -> None:
    """Give a file (or folder) written through a temporary one the permissions a newly created one would have
    (``mkstemp`` makes 0600 files and ``mkdtemp`` 0700 folders)."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)
    except OSError:
        pass


def write_error(path: str | Path, e: OSError) -> InputError:
    """A clear message for a failed write (full disk, read-only folder, permissions)."""
    reason = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
              errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is exceeded"}.get(e.errno, e.strerror or str(e))
    return InputError(f"cannot write {path}: {reason}; nothing was written there")
