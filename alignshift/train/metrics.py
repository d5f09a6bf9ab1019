"""Metric writers: one JSON object per logged step (``metrics.jsonl``)."""

from __future__ import annotations

import json
import math
import os

import numpy as np

__all__ = ["JsonlWriter", "to_python"]


def to_python(x):
    """Convert jax/numpy scalars (and nested dicts) to JSON-ready Python values."""
    if isinstance(x, dict):
        return {k: to_python(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_python(v) for v in x]
    if hasattr(x, "shape") and getattr(x, "shape", None) == ():
        x = np.asarray(x).item()
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)  # JSON has no NaN/inf: keep it visible, not silently null
    return x


class JsonlWriter:
    """Append-only JSONL writer; each line is flushed so a crash loses nothing written."""

    def __init__(self, path: str, *, static: dict | None = None, append: bool = True):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path = path
        self.static = dict(static or {})
        self._f = open(path, "a" if append else "w")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(to_python({**self.static, **record})) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
