"""The training loop: steps, windowed metric logging, progress bar, checkpoint and resume.

Metrics stay on the device between log points: the loop fetches them (one host sync) only
every ``log_every`` steps, averaging over the window as TRL does. A resumed run restores
the state and the data-iterator position from the latest checkpoint and continues with
bit-identical losses (the iterator's batches are a pure function of ``(seed, step)``).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from alignshift.data import BatchIterator
from alignshift.train.checkpoint import Checkpointer
from alignshift.train.metrics import JsonlWriter

__all__ = ["train_loop"]


def _window_mean(window: list[dict]) -> dict:
    stacked = jax.device_get({k: jnp.stack([m[k] for m in window]) for k in window[0]})
    return {k: float(np.mean(v)) for k, v in stacked.items()}


def train_loop(
    step_fn: Callable,
    state: dict,
    iterator: BatchIterator,
    *,
    steps: int,
    log_every: int = 10,
    writer: JsonlWriter | None = None,
    step_args: tuple = (),
    checkpointer: Checkpointer | None = None,
    checkpoint_every: int = 0,
    eval_fn: Callable[[dict], dict] | None = None,
    eval_every: int = 0,
    val_iterator: BatchIterator | None = None,
    desc: str = "train",
    progress: bool | None = None,
) -> tuple[dict, list[dict]]:
    """Run ``steps`` steps of ``state, metrics = step_fn(state, batch, *step_args)``.

    Returns the final state and the list of logged records. With ``val_iterator`` each step
    also gets a deployment/validation batch: ``step_fn(state, batch, *step_args, val_batch)``.
    With a ``checkpointer`` that holds a checkpoint, training resumes from it (iterator
    positions included). ``eval_fn(state) -> dict`` runs every
    ``eval_every`` steps and at the end; its results are logged with prefix ``eval/``.
    """
    history: list[dict] = []
    start = 0
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        iterator.restore(meta["iterator"])
        if val_iterator is not None:
            val_iterator.restore(meta["val_iterator"])
        start = int(meta["step"])
    else:
        iterator.restore({"step": 0})
        if val_iterator is not None:
            val_iterator.restore({"step": 0})

    def log(record):
        history.append(record)
        if writer is not None:
            writer.write(record)

    window: list[dict] = []
    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, disable=(not progress) if progress is not None else None,
               leave=False, dynamic_ncols=True)
    for step in range(start + 1, steps + 1):
        batch = next(iterator)
        if val_iterator is not None:
            state, metrics = step_fn(state, batch, *step_args, next(val_iterator))
        else:
            state, metrics = step_fn(state, batch, *step_args)
        window.append(metrics)
        bar.update(1)
        if step % log_every == 0 or step == steps:
            rec = _window_mean(window)
            window = []
            if not math.isfinite(rec.get("loss", 0.0)):
                raise FloatingPointError(f"{desc}: non-finite loss {rec['loss']} at step {step}")
            rec.update(step=step, time_s=round(time.perf_counter() - t0, 3))
            bar.set_postfix(loss=f"{rec['loss']:.4f}")
            log(rec)
        if eval_fn is not None and eval_every and (step % eval_every == 0 or step == steps):
            log({"step": step, **{f"eval/{k}": v for k, v in eval_fn(state).items()}})
        if checkpointer is not None and (
            (checkpoint_every and step % checkpoint_every == 0) or step == steps
        ):
            meta = {"step": step, "iterator": iterator.state()}
            if val_iterator is not None:
                meta["val_iterator"] = val_iterator.state()
            checkpointer.save(step, state, meta)
    bar.close()
    return state, history
