"""Gradient accumulation: one optimiser step over ``k`` micro-batches that gives the update of
one step over the whole batch — for every objective.

A step's batch (``train.batch_size`` pairs, the effective batch) is split into ``k``
(``train.grad_accum_steps``) equal micro-batches, run one after another under ``lax.scan`` so
only one micro-batch's activations are alive at a time. The split is interleaved: micro-batch
``m`` holds rows ``m, m + k, m + 2k, …`` of every array (:func:`split_micro_batches`), so on a
mesh whose data axes shard the batch each micro-batch still spans every device evenly.

How the micro-batches combine depends on the objective and ``weighting_scope``:

* **sum-decomposable objectives** (:func:`sum_decomposable`: a base loss without batch
  reductions, a rule whose weights are per example — ``uniform``, WPO unless it normalises —,
  and no penalty or a mean penalty): one pass. Each micro-batch's gradient is taken on its own
  and the ``k`` gradients are averaged. The per-example inputs of every micro-batch are kept
  (a few ``[B]`` vectors) and the objective is evaluated once on the whole batch's inputs,
  so the logged loss and metrics are the whole batch's.
* **batch-coupled objectives** (KLDPO's tilt, DR-DPO's and DoRA's/DRO's log-mean-exp, IW-DPO's
  KMM, KTO's batch reference point, WDPO's ``sqrt_mean`` penalty) with
  ``weighting_scope="global"`` (the default): two passes. A forward-only pass over the
  micro-batches gives every example's per-sequence outputs (log-probs, token counts, WPO terms,
  WDPO's per-pair penalty); the objective — rule, weights, penalty — runs once on the whole
  batch, and its vector-Jacobian product gives each output's cotangent ``c = ∂objective/∂out``
  (for a linear rule ``c`` carries the weights ``w_i/n``, for a log-mean-exp rule
  ``∂objective/∂ℓ_i`` through the base loss). The backward pass then runs per micro-batch on
  the surrogate ``Σ_i c_i·out_i(θ)``, whose gradient is exactly the whole batch's
  ``∇θ objective`` by the chain rule. Cost: one extra forward of the policy per step.
* ``weighting_scope="micro_batch"``: each micro-batch is its own batch — its own weights,
  reference point and penalty — and the ``k`` gradients, losses and metrics are averaged. This
  is what the authors' code does when it accumulates (see ``docs/scale.md``): Dr.DPO's
  reduces over micro-batches of 4; KLDPO's (``src/kldpo.py``) centres and tilts the losses of
  the global micro-batch of the step (all data-parallel ranks, not the accumulated batch);
  DoRA's released script runs one prompt per device, so its log-mean-exp reduces to pure
  reweighting (``grad_accum_steps = batch_size`` in this scope reproduces that). WDPO's
  ``squared_mean`` penalty is a mean over pairs, so the scope does not change it. Rules that
  read the step (IW-DPO's warm-up, counted as ``step·n``) see ``step·k + m`` for micro-batch
  ``m``, so they count examples as if each micro-batch were a step.

The reference log-probs (when the reference runs in the step) are computed micro-batch by
micro-batch too, in a forward-only pass before the policy passes. A validation batch (IW-DPO's
deployment batch) goes through the policy once per step, for features only.

WDPO's first-order penalty gradients (:class:`~alignshift.losses.penalties.PenaltyGradient`
modes other than ``exact``) run per micro-batch: with the ``squared_mean`` penalty (a mean over
pairs) the average of the micro-batch gradients is the whole batch's; the ``sqrt_mean`` penalty
couples the batch and needs ``mode="exact"`` (or ``weighting_scope="micro_batch"``) to accumulate.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from alignshift.config import WEIGHTING_SCOPES
from alignshift.forward import attach_reference, validation_inputs
from alignshift.losses import Objective
from alignshift.losses.objective import BASE_LOSSES
from alignshift.losses.penalties import PAIR_PENALTY, penalty_from_pairs, penalty_is_mean
from alignshift.losses.weighting import WEIGHTING_RULES
from alignshift.train.penalty import add_penalty, penalty_terms

__all__ = [
    "WEIGHTING_SCOPES",
    "accumulated_loss_and_grads",
    "check_weighting_scope",
    "merge_micro_batches",
    "split_micro_batches",
    "sum_decomposable",
]



def check_weighting_scope(scope: str) -> None:
    """Raise ``ValueError`` unless ``scope`` is one of :data:`WEIGHTING_SCOPES`."""
    if scope not in WEIGHTING_SCOPES:
        raise ValueError(f"weighting_scope must be one of {WEIGHTING_SCOPES}; got {scope!r}")


def sum_decomposable(objective: Objective) -> bool:
    """Whether ``objective`` is a mean over examples of terms that each depend on one example
    only (then the average of equal micro-batches' objectives and gradients is the batch's)."""
    if BASE_LOSSES[objective.base].collectives:  # KTO's batch reference point
        return False
    if not WEIGHTING_RULES[objective.weighting].is_per_example(objective.weighting_kwargs):
        return False
    return objective.penalty is None or penalty_is_mean(objective.penalty, objective.penalty_kwargs)


def split_micro_batches(batch: dict, k: int) -> dict:
    """Every array of ``batch`` (leading axis ``N``, divisible by ``k``) as ``[k, N/k, ...]``,
    micro-batch ``m`` holding rows ``m, m + k, m + 2k, …`` (interleaved, so a batch sharded over
    devices on its leading axis gives micro-batches that each span every device)."""
    out = {}
    for key, x in batch.items():
        n = x.shape[0] if getattr(x, "ndim", 0) else None
        if n is None or n % k:
            raise ValueError(f"gradient accumulation over {k} micro-batches: batch[{key!r}] has leading size {n}, "
                             f"which is not divisible by {k} (train.batch_size must be a multiple of "
                             "train.grad_accum_steps)")
        out[key] = jnp.swapaxes(x.reshape(n // k, k, *x.shape[1:]), 0, 1)
    return out


def merge_micro_batches(tree):
    """Inverse of :func:`split_micro_batches` on a tree of ``[k, n, ...]`` arrays -> ``[k·n, ...]``
    in the batch's original row order."""
    return jax.tree_util.tree_map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def _floating(x) -> bool:
    return jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)


def _zeros_f32(params):
    return jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)


def _add(acc, g):
    return jax.tree_util.tree_map(lambda a, b: a + b.astype(jnp.float32), acc, g)


def _mean_grads(acc, params, k: int):
    return jax.tree_util.tree_map(lambda a, p: (a / k).astype(p.dtype), acc, params)


def accumulated_loss_and_grads(graphdef, rest, params, batch, val_batch, ref_params, step, *, objective: Objective,
                               logits_fn, k: int, scope: str = "global", custom: Callable | None = None):
    """``(loss, metrics, grads)`` of one step over ``batch`` as ``k`` micro-batches (see the module
    docstring): the whole batch's objective and gradient (``scope="global"``) or the average of
    the micro-batches' (``scope="micro_batch"``). ``ref_params`` (or None: precomputed reference
    log-probs in the batch) and ``val_batch`` as in
    :func:`alignshift.train.steps.make_preference_step`; ``custom`` a penalty's first-order
    gradient (:func:`alignshift.train.penalty.penalty_grads` with ``with_outputs=True``)."""
    check_weighting_scope(scope)
    micro = split_micro_batches(batch, k)
    if ref_params is not None and "reference" in objective.requires:
        def ref_pass(_, mb):  # forward-only, one micro-batch at a time
            out = attach_reference(logits_fn, mb, objective, ref_params)
            return None, {key: v for key, v in out.items() if key not in mb}

        _, refs = jax.lax.scan(ref_pass, None, micro)
        micro = {**micro, **refs}
    val_batch = attach_reference(logits_fn, val_batch, objective, ref_params)
    val_inputs = validation_inputs(logits_fn, params, val_batch, objective)

    def outputs(p, mb):
        """The micro-batch's per-example outputs: the objective's inputs (+ per-pair penalties)."""
        inputs, _, pair_pen = penalty_terms(graphdef, rest, p, mb, objective, logits_fn)
        return inputs if pair_pen is None else {**inputs, PAIR_PENALTY: pair_pen}

    def reduce(outs, s):
        """The objective (+ penalty) of a batch's outputs: ``(loss, metrics)``."""
        outs = dict(outs)
        pair_pen = outs.pop(PAIR_PENALTY, None)
        outs["step"] = s
        loss, metrics = objective(outs, val_inputs)
        penalty = None if pair_pen is None else penalty_from_pairs(objective.penalty, pair_pen,
                                                                   objective.penalty_kwargs)
        return add_penalty(loss, metrics, penalty, pair_pen)

    steps = jnp.arange(k, dtype=jnp.int32)
    if custom is not None:  # first-order penalty gradient: (loss, metrics, grads, outputs) per micro-batch
        return _custom_accumulated(custom, graphdef, rest, params, micro, step, steps, scope, objective, reduce)

    if scope == "micro_batch":
        def own_batch(acc, xs):
            mb, m = xs
            (loss, metrics), g = jax.value_and_grad(lambda p: reduce(outputs(p, mb), step * k + m),
                                                    has_aux=True)(params)
            return _add(acc, g), (loss, metrics)

        acc, (losses, metrics) = jax.lax.scan(own_batch, _zeros_f32(params), (micro, steps))
        metrics = jax.tree_util.tree_map(lambda x: x.mean(axis=0), metrics)
        return losses.mean(), metrics, _mean_grads(acc, params, k)

    if sum_decomposable(objective):
        def one_pass(acc, mb):
            def f(p):
                outs = outputs(p, mb)
                return reduce(outs, step)[0], outs

            (_, outs), g = jax.value_and_grad(f, has_aux=True)(params)
            return _add(acc, g), jax.lax.stop_gradient(outs)

        acc, outs = jax.lax.scan(one_pass, _zeros_f32(params), micro)
        loss, metrics = reduce(merge_micro_batches(outs), step)
        return loss, metrics, _mean_grads(acc, params, k)

    # batch-coupled, global scope: forward-only pass, the objective's VJP on the whole batch's
    # outputs, then per micro-batch backward passes on Σ c·out
    def forward(_, mb):
        return None, jax.lax.stop_gradient(outputs(params, mb))

    _, outs = jax.lax.scan(forward, None, micro)
    outs = merge_micro_batches(outs)
    diff = {key: v for key, v in outs.items() if _floating(v)}
    const = {key: v for key, v in outs.items() if key not in diff}
    loss, vjp_fn, metrics = jax.vjp(lambda d: reduce({**const, **d}, step), diff, has_aux=True)
    (cot,) = vjp_fn(jnp.ones_like(loss))
    cot = split_micro_batches(cot, k)

    def backward(acc, xs):
        mb, c = xs

        def surrogate(p):  # Σ_i c_i·out_i(θ): its gradient is this micro-batch's part of ∇θ objective
            outs_ = outputs(p, mb)
            return sum(jnp.sum(c[key] * outs_[key]) for key in c)

        return _add(acc, jax.grad(surrogate)(params)), None

    acc, _ = jax.lax.scan(backward, _zeros_f32(params), (micro, cot))
    return loss, metrics, jax.tree_util.tree_map(lambda a, p: a.astype(p.dtype), acc, params)


def _custom_accumulated(custom, graphdef, rest, params, micro, step, steps, scope, objective, reduce):
    """A penalty's first-order gradient (WDPO), per micro-batch, averaged."""
    if scope == "global" and not sum_decomposable(objective):
        raise ValueError(f"a first-order penalty gradient with gradient accumulation and weighting_scope 'global' needs "
                         f"an objective that is a mean over pairs (penalty_kwargs penalty='squared_mean'); got "
                         f"penalty {objective.penalty!r} with {objective.penalty_kwargs}: use penalty_gradient mode "
                         "'exact' or train.weighting_scope 'micro_batch'")
    k = steps.shape[0]

    def body(acc, xs):
        mb, m = xs
        loss, metrics, g, outs = custom(graphdef, rest, params, mb, step * k + m)
        return _add(acc, g), (loss, metrics, outs)

    acc, (losses, metrics, outs) = jax.lax.scan(body, _zeros_f32(params), (micro, steps))
    grads = _mean_grads(acc, params, k)
    if scope == "micro_batch":
        return losses.mean(), jax.tree_util.tree_map(lambda x: x.mean(axis=0), metrics), grads
    loss, metrics = reduce(merge_micro_batches(outs), step)
    return loss, metrics, grads
