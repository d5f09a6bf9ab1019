"""Host-side fault handling for the training loop: non-finite step accounting, the bad-batch
dump, and the SIGTERM (preemption) handler.

* A step whose loss or gradient is non-finite is **not applied** by the optimiser
  (:func:`alignshift.train.optim.skip_nonfinite`, inside the jitted step). The loop learns about
  it from the step metrics at its next log point (no extra host synchronisation per step): each
  such step is logged (``event: "nonfinite_step"`` record with the loop step and the batch's
  example indices) and counted; after ``max_consecutive`` consecutive ones the offending batch
  is written to disk (:func:`dump_batch`, atomically) and :class:`NonFiniteError` is raised.
* :class:`PreemptionHandler` turns SIGTERM into a flag the loop polls after every step: it then
  saves a final checkpoint and raises :class:`Preempted` (a ``SystemExit`` with status 143,
  128 + SIGTERM, the code a process killed by SIGTERM would report).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from typing import Mapping

import numpy as np

from alignshift.io import atomic_write

__all__ = ["NonFiniteError", "Preempted", "FaultCounter", "PreemptionHandler", "dump_batch", "load_batch_dump"]

log = logging.getLogger("alignshift.train")


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps with a non-finite loss or gradient; names the steps, the
    batch indices and the file the offending batch was written to (``dump_path``)."""

    def __init__(self, message: str, dump_path: str | None = None):
        super().__init__(message)
        self.dump_path = dump_path


class Preempted(SystemExit):
    """Raised by the loop after the final save that a SIGTERM requested (exit status 143)."""

    def __init__(self, step: int, checkpoint_saved: bool):
        super().__init__(143)
        self.step = step
        self.checkpoint_saved = checkpoint_saved

    def __str__(self) -> str:
        return f"preempted (SIGTERM) at step {self.step}; checkpoint saved: {self.checkpoint_saved}"


class FaultCounter:
    """Counts non-finite steps (consecutive and total) and remembers the current streak."""

    def __init__(self, max_consecutive: int):
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int) or max_consecutive < 1:
            raise ValueError(f"max_consecutive_nonfinite must be a positive int, got {max_consecutive!r}")
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0
        self.streak: list[int] = []  # loop steps of the current run of consecutive faults

    def update(self, step: int, ok: bool) -> None:
        if ok:
            self.consecutive = 0
            self.streak = []
        else:
            self.consecutive += 1
            self.total += 1
            self.streak = (self.streak + [int(step)])[-self.max_consecutive:]

    @property
    def exceeded(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def state(self) -> dict:
        return {"consecutive": self.consecutive, "total": self.total, "streak": list(self.streak)}

    def restore(self, st: Mapping | None) -> None:
        st = st or {}
        self.consecutive = int(st.get("consecutive", 0))
        self.total = int(st.get("total", 0))
        self.streak = [int(s) for s in st.get("streak", [])]


def dump_batch(directory: str, step: int, batch: Mapping[str, np.ndarray], *, info: dict | None = None) -> str:
    """Write ``batch`` (plus ``info`` as JSON) to ``<directory>/nonfinite_batch_step<step>.npz``
    atomically (temporary file in the same directory, then ``os.replace``); returns the path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"nonfinite_batch_step{int(step)}.npz")
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    arrays["__info__"] = np.asarray(json.dumps(info or {}, default=str))
    with atomic_write(path) as f:
        np.savez(f, **arrays)
    return path


def load_batch_dump(path: str) -> tuple[dict, dict]:
    """``(batch, info)`` from a :func:`dump_batch` file."""
    with np.load(path) as z:
        batch = {k: z[k] for k in z.files if k != "__info__"}
        info = json.loads(str(z["__info__"])) if "__info__" in z.files else {}
    return batch, info


class PreemptionHandler:
    """Context manager: while active, SIGTERM sets :attr:`requested` instead of killing the
    process (installed only in the main thread, where Python delivers signals; elsewhere, or
    with ``enabled=False``, it is inert). The previous handler is restored on exit."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested = False
        self._previous = None
        self._installed = False

    def _handle(self, signum, frame):
        self.requested = True
        log.warning("SIGTERM received: saving a final checkpoint after the current step, then exiting")

    def __enter__(self) -> "PreemptionHandler":
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False
