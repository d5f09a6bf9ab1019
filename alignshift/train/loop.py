"""The training loop: steps, windowed metric logging, progress bar, checkpoint and resume,
non-finite step accounting and preemption (SIGTERM) handling.

Metrics stay on the device between log points: the loop fetches them (one host sync) only
every ``log_every`` steps (and at checkpoints), averaging over the window as TRL does.

Faults (see :mod:`alignshift.train.faults`): a step whose loss or gradient norm is non-finite
was not applied by the optimiser (:func:`alignshift.train.optim.skip_nonfinite`); the loop
finds it in the fetched metrics, leaves it out of the window mean (the record then carries
``nonfinite_steps``), writes an ``event: "nonfinite_step"`` record with the batch's example
indices, and after ``max_consecutive_nonfinite`` consecutive such steps writes the offending
batch to disk and raises :class:`~alignshift.train.faults.NonFiniteError`. Detection happens
when the metrics are fetched, so the run stops at most ``log_every - 1`` steps after the K-th
fault (those steps are not applied either if they are non-finite). A run in which no step at
all was finite also raises at its end.

Resume: a checkpoint holds the train state (params, optimizer state, step counter) and JSON
metadata: the loop step, the data-iterator positions (with their seed, batch size and data
size, checked on restore), the fault counters and the metrics of the not-yet-logged steps of
the current window. A resumed run therefore continues with bit-identical losses *and*
bit-identical logged records (the iterator's batches are a pure function of ``(seed, step)``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from typing import Callable

import jax
import numpy as np
from tqdm.auto import tqdm

from alignshift.data import BatchIterator
from alignshift.train.checkpoint import Checkpointer
from alignshift.train.faults import FaultCounter, NonFiniteError, PreemptionHandler, Preempted, dump_batch
from alignshift.train.metrics import JsonlWriter
from alignshift.train import tracking

__all__ = ["train_loop", "DEFAULT_MAX_CONSECUTIVE_NONFINITE"]

log = logging.getLogger("alignshift.train")

#: Default K: consecutive non-finite steps after which a run stops (``train.max_consecutive_nonfinite``).
DEFAULT_MAX_CONSECUTIVE_NONFINITE = 10


def _iterator_state(it: BatchIterator) -> dict:
    # ``length_bucket``: 0 for a plain BatchIterator, the bucket of a LengthBucketIterator (whose
    # data order differs); checkpoints written before the key existed skip that check
    return {**it.state(), "seed": it.seed, "batch_size": it.batch_size, "num_examples": it.num_examples,
            "shuffle": it.shuffle, "length_bucket": _length_bucket(it)}


def _length_bucket(it: BatchIterator) -> int:
    return int(getattr(it, "bucket", 0) or 0)


def _restore_iterator(it: BatchIterator, st: dict, name: str, where: str) -> None:
    for key in ("seed", "batch_size", "num_examples", "shuffle", "length_bucket"):
        mine = _length_bucket(it) if key == "length_bucket" else getattr(it, key)
        if key in st and st[key] != mine:
            raise ValueError(
                f"{where}: the checkpoint's {name} has {key}={st[key]!r} but this run's has "
                f"{mine!r}: resuming would not continue the same data order (use a new "
                "output directory or the original config)"
            )
    it.restore(st)


def _has_guard(state) -> bool:
    """Whether the optimizer state holds :func:`alignshift.train.optim.skip_nonfinite`'s state."""
    from alignshift.train.optim import SkipNonFiniteState

    opt = state.get("opt_state") if isinstance(state, dict) else None
    leaves = jax.tree_util.tree_leaves(opt, is_leaf=lambda x: isinstance(x, SkipNonFiniteState))
    return any(isinstance(x, SkipNonFiniteState) for x in leaves)


def _is_ok(m: dict) -> bool:
    loss, gn = m.get("loss"), m.get("grad_norm")
    return bool(np.all(np.isfinite(loss)) if loss is not None else True) and bool(
        np.all(np.isfinite(gn)) if gn is not None else True
    )


def _window_record(window: list[dict]) -> dict:
    """Mean over the window's finite steps of every metric (all NaN if there is none)."""
    good = [m for m in window if m["ok"]]
    keys = [k for k in window[0]["metrics"]]
    rec = {}
    for k in keys:
        vals = [np.asarray(m["metrics"][k]) for m in good]
        rec[k] = float(np.mean(np.stack(vals))) if vals else float("nan")
    n_bad = len(window) - len(good)
    if n_bad:
        rec["nonfinite_steps"] = n_bad
    return rec


def _window_to_json(window: list[dict]) -> list[dict]:
    out = []
    for w in window:
        ms = {k: {"v": np.asarray(v).tolist(), "dtype": str(np.asarray(v).dtype)} for k, v in w["metrics"].items()}
        out.append({**{k: w[k] for k in ("step", "it", "val_it", "ok")}, "metrics": ms})
    return out


def _window_from_json(saved: list[dict]) -> list[dict]:
    out = []
    for w in saved:
        ms = {k: np.asarray(d["v"], dtype=d["dtype"]) for k, d in w["metrics"].items()}
        out.append({**{k: w[k] for k in ("step", "it", "val_it", "ok")}, "metrics": ms, "host": True})
    return out


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
    max_consecutive_nonfinite: int = DEFAULT_MAX_CONSECUTIVE_NONFINITE,
    fault_dir: str | None = None,
    handle_sigterm: bool = True,
) -> tuple[dict, list[dict]]:
    """Run ``steps`` steps of ``state, metrics = step_fn(state, batch, *step_args)``.

    Returns the final state and the list of logged records. With ``val_iterator`` each step
    also gets a deployment/validation batch: ``step_fn(state, batch, *step_args, val_batch)``.
    With a ``checkpointer`` that holds a checkpoint, training resumes from it (iterator
    positions, fault counters and the pending log window included). ``eval_fn(state) -> dict``
    runs every ``eval_every`` steps and at the end; its results are logged with prefix ``eval/``.

    Faults: see the module docstring. ``fault_dir`` is where the offending batch is written
    when the run stops (default: the checkpoint directory, else the metrics file's directory,
    else a new temporary directory). With ``handle_sigterm`` (main thread only) a SIGTERM makes
    the loop save a checkpoint after the current step and raise
    :class:`~alignshift.train.faults.Preempted` (``SystemExit(143)``).
    """
    if log_every < 1:
        raise ValueError(f"log_every must be >= 1, got {log_every}")
    faults = FaultCounter(max_consecutive_nonfinite)
    guarded = _has_guard(state)
    if not guarded:
        log.warning("%s: the optimizer is not wrapped in alignshift.train.optim.skip_nonfinite: a step with a "
                    "non-finite loss or gradient will be counted and logged but still APPLIED", desc)
    history: list[dict] = []
    window: list[dict] = []
    start = 0
    applied_any = False  # some step of THIS invocation was finite
    if checkpointer is not None and checkpointer.latest_step() is not None:
        state, meta = checkpointer.restore(state)
        where = f"checkpoint {checkpointer.directory} step {checkpointer.latest_step()}"
        _restore_iterator(iterator, meta["iterator"], "data iterator", where)
        if val_iterator is not None:
            if "val_iterator" not in meta:
                raise ValueError(f"{where}: has no validation-iterator position but this run uses one")
            _restore_iterator(val_iterator, meta["val_iterator"], "validation iterator", where)
        start = int(meta["step"])
        faults.restore(meta.get("faults"))
        window = _window_from_json(meta.get("window", []))
    else:
        iterator.restore({"step": 0})
        if val_iterator is not None:
            val_iterator.restore({"step": 0})

    def log_record(record):
        history.append(record)
        if writer is not None:
            writer.write(record)
        # train.report_to: the same record (with the writer's seed/phase/method) to TensorBoard / W&B
        tracking.log({**getattr(writer, "static", {}), **record})

    def fetch():
        """Bring the window's metrics to the host (one sync) and account for faults."""
        pending = [w for w in window if not w.get("host")]
        if not pending:
            return
        host = jax.device_get([w["metrics"] for w in pending])
        for w, m in zip(pending, host):
            w["metrics"], w["host"] = m, True
            w["ok"] = _is_ok(m)
            faults.update(w["step"], w["ok"])
            if not w["ok"]:
                on_fault(w)
            if faults.exceeded:
                stop(w)

    def on_fault(w):
        idx = iterator.indices_at(w["it"]).tolist()
        rec = {"step": w["step"], "event": "nonfinite_step", "batch_indices": idx,
               "loss": float(np.asarray(w["metrics"].get("loss", np.nan))),
               "grad_norm": float(np.asarray(w["metrics"].get("grad_norm", np.nan))),
               "consecutive": faults.consecutive, "total": faults.total}
        if w["val_it"] is not None:
            rec["val_batch_indices"] = val_iterator.indices_at(w["val_it"]).tolist()
        rec["applied"] = not guarded
        log.warning("%s: step %d has a non-finite loss or gradient (loss=%s, grad_norm=%s); update %s "
                    "(%d consecutive, %d total); batch indices %s", desc, w["step"], rec["loss"],
                    rec["grad_norm"], "APPLIED (no guard)" if not guarded else "not applied", faults.consecutive,
                    faults.total, idx)
        log_record(rec)

    def stop(w):
        d = fault_dir
        if d is None:
            if checkpointer is not None:
                d = checkpointer.directory
            elif writer is not None and getattr(writer, "path", None):
                d = os.path.dirname(os.path.abspath(writer.path))
            else:
                d = tempfile.mkdtemp(prefix="alignshift_faults_")
        batch = iterator.batch_at(w["it"])
        batch = {**batch, "batch_indices": iterator.indices_at(w["it"])}
        if w["val_it"] is not None:
            batch.update({f"val/{k}": v for k, v in val_iterator.batch_at(w["val_it"]).items()})
            batch["val/batch_indices"] = val_iterator.indices_at(w["val_it"])
        info = {"desc": desc, "step": w["step"], "streak_steps": faults.streak,
                "metrics": {k: np.asarray(v).tolist() for k, v in w["metrics"].items()}}
        path = dump_batch(d, w["step"], batch, info=info)
        raise NonFiniteError(
            f"{desc}: non-finite loss or gradient in {faults.consecutive} consecutive steps "
            f"{faults.streak} (limit train.max_consecutive_nonfinite={faults.max_consecutive}); none of them "
            f"was applied. Last: step {w['step']}, loss={np.asarray(w['metrics'].get('loss'))}, "
            f"grad_norm={np.asarray(w['metrics'].get('grad_norm'))}, batch indices "
            f"{iterator.indices_at(w['it']).tolist()}; the batch is in {path}",
            dump_path=path,
        )

    def save(step):
        fetch()
        meta = {"step": step, "iterator": _iterator_state(iterator), "faults": faults.state(),
                "window": _window_to_json(window)}
        if val_iterator is not None:
            meta["val_iterator"] = _iterator_state(val_iterator)
        checkpointer.save(step, state, meta)

    t0 = time.perf_counter()
    bar = tqdm(total=steps, initial=start, desc=desc, disable=(not progress) if progress is not None else None,
               leave=False, dynamic_ncols=True)
    with PreemptionHandler(enabled=handle_sigterm) as preempt:
        for step in range(start + 1, steps + 1):
            it_pos = iterator.step
            batch = next(iterator)
            val_pos = None
            if val_iterator is not None:
                val_pos = val_iterator.step
                state, metrics = step_fn(state, batch, *step_args, next(val_iterator))
            else:
                state, metrics = step_fn(state, batch, *step_args)
            window.append({"step": step, "it": it_pos, "val_it": val_pos, "ok": True, "metrics": metrics})
            bar.update(1)
            if step % log_every == 0 or step == steps:
                fetch()
                applied_any = applied_any or any(w["ok"] for w in window if w["step"] > start)
                rec = _window_record(window)
                window = []
                rec.update(step=step, time_s=round(time.perf_counter() - t0, 3))
                bar.set_postfix(loss=f"{rec.get('loss', float('nan')):.4f}")
                log_record(rec)
            if eval_fn is not None and eval_every and (step % eval_every == 0 or step == steps):
                log_record({"step": step, **{f"eval/{k}": v for k, v in eval_fn(state).items()}})
            saved = False
            if checkpointer is not None and (
                (checkpoint_every and step % checkpoint_every == 0) or step == steps
            ):
                save(step)
                saved = True
            if preempt.requested:
                if checkpointer is not None and not saved:
                    save(step)
                    saved = True
                bar.close()
                log.warning("%s: preempted at step %d (checkpoint saved: %s)", desc, step, saved)
                raise Preempted(step, saved)
    bar.close()
    if steps > start and not applied_any:
        raise NonFiniteError(
            f"{desc}: non-finite loss or gradient in every step of the run (steps {start + 1}..{steps}); "
            f"no update was applied"
        )
    return state, history
