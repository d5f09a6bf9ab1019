"""Hyper-parameter specs: each base loss, weighting rule and penalty declares its own.

Every registered loss / rule / penalty lists its hyper-parameters next to its registration
as a tuple of :class:`HParam` ``(name, default, types, bound)``; :func:`alignshift.losses.
objective.check_hparams` validates user kwargs against that tuple (unknown names, then each
value's type and range), and ``make_objective`` calls it, so the config loader and direct
callers get the same checks. A value outside its range gives NaN or a silently meaningless
objective, so it is refused up front.

Types are those a config file can hold: ``"float"``, ``"int"``, ``"bool"``, ``"str"``,
``"None"``. Numbers are interchangeable between ``"int"`` and ``"float"`` (a YAML ``1`` is
a valid ``beta``); ``bool`` is never a number. ``types=()`` means unchecked.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["HParam", "HParamError", "POSITIVE", "NONNEGATIVE"]

POSITIVE = "> 0"
NONNEGATIVE = ">= 0"


class HParamError(ValueError):
    """A hyper-parameter value of the wrong type or outside its range.

    ``group`` is the kwargs dict it came from (``"base_kwargs"``, ``"weighting_kwargs"`` or
    ``"penalty_kwargs"``), ``key`` its name and ``problem`` the requirement it breaks
    (``"must be > 0; got 0"``), so the config loader can name the config key."""

    def __init__(self, where: str, group: str, key: str, problem: str):
        super().__init__(f"{where}: hyper-parameter {key!r} {problem}")
        self.group, self.key, self.problem = group, key, problem


def _number(v) -> float | None:
    """``v`` as a float when it is a concrete, non-bool real number (a Python or NumPy
    scalar, or a 0-d numeric array), else None."""
    if isinstance(v, (bool, np.bool_, str, bytes)) or v is None:
        return None
    if isinstance(v, numbers.Real):
        return float(v)
    if isinstance(v, (np.ndarray, jax.Array)) and np.ndim(v) == 0 and jnp.issubdtype(v.dtype, jnp.number):
        return float(v)
    return None


class HParam(NamedTuple):
    """One hyper-parameter: ``name``, its ``default`` (as the implementing function's
    signature has it), the ``types`` a value may have and an optional ``bound``
    (:data:`POSITIVE` or :data:`NONNEGATIVE`)."""

    name: str
    default: Any
    types: tuple[str, ...] = ()
    bound: str | None = None

    def problem(self, v) -> str | None:
        """Why ``v`` is not a valid value (``"must be > 0; got 0"``), or None if it is."""
        if not self.types or isinstance(v, jax.core.Tracer):
            return None  # unchecked, or traced (its value is the caller's business)
        x = _number(v)
        ok = ((v is None and "None" in self.types)
              or (isinstance(v, bool) and "bool" in self.types)
              or (x is not None and bool(set(self.types) & {"int", "float"}))
              or (isinstance(v, str) and "str" in self.types))
        if not ok:
            return f"must be {' or '.join(sorted(self.types))}; got {v!r}"
        if x is not None:
            if not math.isfinite(x):
                return f"must be finite; got {v!r}"
            if self.bound == POSITIVE and x <= 0:
                return f"must be > 0; got {v!r}"
            if self.bound == NONNEGATIVE and x < 0:
                return f"must be >= 0; got {v!r}"
        return None
