"""Checkpoints that a kill cannot leave half-written: write under a temporary name, then rename.

A process killed while it writes a checkpoint (``kill -9``, an out-of-memory kill, a pre-empted node)
must leave the previous checkpoint under its name, loadable. Both formats are written next to their
final path, under :func:`partial_path`, and renamed onto it once complete:

* a full file: :func:`write_file`, one ``os.replace`` (atomic on a POSIX filesystem; the temporary
  file is in the same directory, so never a cross-device copy);
* a DCP directory: every rank writes its shards into the partial directory, DCP writes its
  ``.metadata`` after them, rank 0 writes ``meta.pt`` last; then :func:`replace_directory` moves the
  old directory aside, renames the new one onto the path and deletes the old one.

Only local paths are renamed; remote (fsspec) paths are written in place by their own writers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


def is_local(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a plain local path (no ``scheme://``) that ``os.replace`` can rename."""
    return "://" not in str(path) or str(path).startswith("file://")


def partial_path(path: Path) -> Path:
    """Where ``path`` is written before it is complete: a hidden sibling (``.<name>.partial``)."""
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def write_file(write: Callable[[Path], None], path: Path) -> None:
    """Run ``write(temporary path)``, then rename the result onto ``path`` (the previous file stays until then)."""
    partial = partial_path(path)
    partial.parent.mkdir(parents=True, exist_ok=True)
    try:
        write(partial)
        os.replace(partial, path)
    finally:
        if partial.exists():  # write raised: leave no partial file behind
            partial.unlink()


def clear_partial(path: Path) -> Path:
    """Remove what an interrupted save left at :func:`partial_path` of ``path``; returns that (now free) path."""
    partial = partial_path(path)
    if partial.is_dir():
        shutil.rmtree(partial)
    elif partial.exists():
        partial.unlink()
    return partial


def replace_directory(partial: Path, path: Path) -> None:
    """Move a complete directory ``partial`` onto ``path``, replacing what was there (a file or a directory).

    ``os.replace`` cannot rename over a non-empty directory: the old one is first renamed aside
    (``.<name>.old``) and deleted after. A kill between the two renames leaves the previous
    checkpoint complete under that name.
    """
    old = path.with_name(f".{path.name}.old")
    if old.is_dir():
        shutil.rmtree(old)
    if path.is_dir():
        os.replace(path, old)
    elif path.exists():
        path.unlink()
    os.replace(partial, path)
    if old.is_dir():
        shutil.rmtree(old)
