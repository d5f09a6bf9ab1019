"""Deterministic, resumable mini-batch iteration over in-memory arrays.

``BatchIterator.batch_at(step)`` is a pure function of ``(seed, step)``:
``epoch = step // steps_per_epoch``; the epoch's order is
``np.random.default_rng([seed, epoch]).permutation(N)`` (identity when
``shuffle=False``); batch ``step % steps_per_epoch`` of that order is returned;
the last incomplete batch of each epoch is dropped. Iteration (``next``)
returns ``batch_at(step)`` and increments ``step``; ``state()``/``restore()``
save and restore ``step``, which makes resumption bit-identical.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

__all__ = ["BatchIterator"]


class BatchIterator:
    def __init__(self, arrays: Mapping[str, np.ndarray], batch_size: int, *, seed: int, shuffle: bool = True):
        if not arrays:
            raise ValueError("arrays is empty")
        self.arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (v.shape[0] if v.ndim else None) for k, v in self.arrays.items()}
        if len(set(sizes.values())) != 1 or None in sizes.values():
            raise ValueError(f"all arrays need the same leading dimension, got {sizes}")
        n = next(iter(sizes.values()))
        if n == 0:
            raise ValueError("cannot iterate over zero examples (N == 0)")
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if batch_size > n:
            raise ValueError(f"batch_size {batch_size} > number of examples {n}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_examples = int(n)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self.steps_per_epoch = self.num_examples // self.batch_size
        self.step = 0
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_examples)
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            self._perm_cache = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.num_examples))
        return self._perm_cache[1]

    def indices_at(self, step: int) -> np.ndarray:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        epoch, k = divmod(step, self.steps_per_epoch)
        return self._order(epoch)[k * self.batch_size:(k + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        idx = self.indices_at(step)
        return {k: v[idx] for k, v in self.arrays.items()}

    def epoch_of(self, step: int) -> int:
        return int(step) // self.steps_per_epoch

    def __iter__(self) -> "BatchIterator":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self.batch_at(self.step)
        self.step += 1
        return batch

    def state(self) -> dict:
        return {"step": int(self.step)}

    def restore(self, state: Mapping) -> None:
        step = int(state["step"])
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        self.step = step
