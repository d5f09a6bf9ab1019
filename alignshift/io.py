"""Atomic file writes: a file appears complete at its path or not at all (a temporary file in
the same directory, then ``os.replace``; removed on any error). Used by every writer of results,
checkpointed batches, caches and model folders."""

from __future__ import annotations

import contextlib
import os
import tempfile

__all__ = ["atomic_path", "atomic_write"]


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary path next to ``path`` (same suffix); on success it replaces ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "wb"):
    """Yield a file opened with ``mode`` whose contents replace ``path`` once written and synced."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
