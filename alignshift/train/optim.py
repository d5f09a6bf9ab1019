"""Optimiser construction: AdamW with linear warm-up + cosine decay (to ``min_lr_ratio·lr``) and
global-norm clipping, wrapped in :func:`skip_nonfinite` so a step whose loss or gradient is not
finite is not applied.

The guard lives inside the optimiser, hence inside every jitted (or pmapped, or sharded) step
that calls ``tx.update``: no host synchronisation per step. The train steps pass the loss as
optax's ``value`` extra argument (``tx.update(grads, opt_state, params, value=loss)``); a
transformation that does not get it checks the gradients only. The training loop
(:mod:`alignshift.train.loop`) counts the skipped steps from the step metrics and stops the
run after ``train.max_consecutive_nonfinite`` consecutive ones.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from alignshift.config import OptimConfig

__all__ = ["make_schedule", "schedule_length", "warmup_length", "make_optimizer", "skip_nonfinite", "is_finite_step", "SkipNonFiniteState"]


class SkipNonFiniteState(NamedTuple):
    """As ``optax.ApplyIfFiniteState``: ``notfinite_count`` (consecutive skipped steps),
    ``last_finite``, ``total_notfinite`` and the wrapped optimiser's ``inner_state``."""

    notfinite_count: jax.Array
    last_finite: jax.Array
    total_notfinite: jax.Array
    inner_state: Any


def is_finite_step(loss, grads) -> jax.Array:
    """The one criterion used everywhere: ``isfinite(loss) & isfinite(‖grads‖₂)``.

    The global norm is non-finite iff a gradient entry is NaN/±inf, or the gradient is so large
    that its squared norm overflows (an update that clipping could not make meaningful either).
    It is the same expression as the steps' ``grad_norm`` metric, so the loop's fault count
    (computed from the metrics) and the guard's decision agree exactly.
    """
    ok = jnp.isfinite(optax.tree.norm(grads))
    if loss is not None:
        ok = jnp.logical_and(ok, jnp.all(jnp.isfinite(loss)))
    return ok


def skip_nonfinite(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """Like ``optax.apply_if_finite`` but it never gives up, and it also checks the loss.

    ``update(grads, state, params, value=loss)``: if :func:`is_finite_step` is false the
    returned updates are zeros (``apply_updates`` leaves the parameters bit-identical) and the
    inner state (Adam moments, schedule count) is kept as it was, i.e. the step is not applied;
    otherwise the inner update is returned unchanged (bit-identical to the unwrapped optimiser).
    Stopping after too many consecutive faults is the training loop's job.
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return SkipNonFiniteState(
            notfinite_count=jnp.zeros([], jnp.int32),
            last_finite=jnp.array(True, jnp.bool_),
            total_notfinite=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
        )

    def update(updates, state, params=None, **extra_args):
        ok = is_finite_step(extra_args.get("value"), updates)
        new_updates, new_inner = jax.lax.cond(
            ok,
            lambda: inner.update(updates, state.inner_state, params, **extra_args),
            lambda: (optax.tree.zeros_like(updates), state.inner_state),
        )
        bad = jnp.logical_not(ok).astype(jnp.int32)
        return new_updates, SkipNonFiniteState(
            notfinite_count=jnp.where(ok, 0, state.notfinite_count + 1).astype(jnp.int32),
            last_finite=ok,
            total_notfinite=state.total_notfinite + bad,
            inner_state=new_inner,
        )

    return optax.GradientTransformationExtraArgs(init, update)


def schedule_length(cfg: OptimConfig, total_steps: int) -> int:
    """The schedule's length in steps: ``cfg.schedule_steps``, or the phase's ``total_steps``."""
    return cfg.schedule_steps if cfg.schedule_steps > 0 else total_steps


def warmup_length(cfg: OptimConfig, total_steps: int) -> int:
    """Warm-up steps: ``ceil(warmup_ratio · schedule length)`` when ``warmup_ratio > 0`` (as
    OpenRLHF and HF ``TrainingArguments`` count it), else ``warmup_steps``; at most the schedule
    length − 1."""
    n = schedule_length(cfg, total_steps)
    warmup = math.ceil(cfg.warmup_ratio * n) if cfg.warmup_ratio > 0 else cfg.warmup_steps
    return min(warmup, max(n - 1, 0))


def make_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to ``cfg.lr`` over :func:`warmup_length` steps, then a cosine from
    ``cfg.lr`` down to ``cfg.min_lr_ratio · cfg.lr`` at the end of the schedule
    (:func:`schedule_length`): HF's ``cosine_with_min_lr`` (OpenRLHF's schedule; 0.1 there).
    The defaults (``warmup_ratio = min_lr_ratio = 0``, ``schedule_steps = 0``) are the
    warm-up of ``warmup_steps`` and a cosine to 0 over ``total_steps``."""
    n = schedule_length(cfg, total_steps)
    warmup = warmup_length(cfg, total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup, decay_steps=max(n, warmup + 1),
        end_value=cfg.min_lr_ratio * cfg.lr,
    )


def make_optimizer(cfg: OptimConfig, total_steps: int, *, guard: bool = True) -> optax.GradientTransformation:
    """AdamW (+ clipping) behind :func:`skip_nonfinite` (``guard=False``: the bare chain)."""
    parts = []
    if cfg.grad_clip and cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(cfg.grad_clip))
    parts.append(
        optax.adamw(make_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay)
    )
    tx = optax.chain(*parts)
    return skip_nonfinite(tx) if guard else tx
