"""Directories built once into jaxpaged's cache (``$JAXPAGED_CACHE``, else ``~/.cache/jaxpaged``).

A cached directory carries a stamp file; a directory whose stamp differs from the caller's is
stale and rebuilt. Building happens in a temporary sibling directory that is renamed into place,
so concurrent callers never see a half-written one.

Imports only the standard library (the golden-reference scripts import it from a torch venv).
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable


def cache_root() -> pathlib.Path:
    """``$JAXPAGED_CACHE``, or ``~/.cache/jaxpaged``."""
    return pathlib.Path(os.environ.get("JAXPAGED_CACHE", "~/.cache/jaxpaged")).expanduser()


def cached_build(directory: pathlib.Path, stamp: str, stamp_file: str,
                 build: Callable[[pathlib.Path], None]) -> pathlib.Path:
    """``directory``, made by ``build(empty_dir)`` unless it exists with ``stamp`` in its
    ``stamp_file``; returns ``directory``."""
    stamp_path = directory / stamp_file
    if stamp_path.is_file() and stamp_path.read_text(encoding="utf-8") == stamp:
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        build(staging)
        (staging / stamp_file).write_text(stamp, encoding="utf-8")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if directory.exists():  # stale: move it aside first (rename is atomic, rmtree is not)
        stale = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}-stale-",
                                              dir=directory.parent))
        try:
            directory.rename(stale / "old")
        except OSError:
            pass  # another process replaced it meanwhile
        shutil.rmtree(stale, ignore_errors=True)
    try:
        staging.rename(directory)
    except OSError:  # another process won the race; what it built is the same
        shutil.rmtree(staging, ignore_errors=True)
    return directory
