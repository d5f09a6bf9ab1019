"""WDPO's penalty in the train step: its value from the policy's input embeddings, and the
three ways to take its parameter gradient.

WDPO (Xu et al., NeurIPS 2025) adds ``ρ·mean_i ‖∂L_i/∂e_i‖²`` (or its square root) to the
DPO loss, with ``e`` the input token embeddings (the pure penalty on given embedding gradients
is :func:`alignshift.losses.penalties.wdpo_penalty`). Its parameter gradient differentiates
through an embedding gradient; the training setting
:class:`~alignshift.losses.penalties.PenaltyGradient` chooses how:

* ``mode="exact"`` — double back-propagation (:func:`wdpo_inputs_and_penalty`, differentiated by
  the step's ``value_and_grad``), as the authors' ``create_graph=True``;
* ``mode="forward_over_reverse"`` / ``"finite_difference"`` (optionally on ``pairs`` pairs) —
  first-order passes only (:func:`wdpo_first_order_grads`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from alignshift.forward import (
    assemble_inputs,
    concat_groups,
    make_logits_fn,
    reference_logps,
    sequence_groups,
    split_groups,
)
from alignshift.losses import Objective, sequence_logps
from alignshift.losses.logps import sequence_logps_wpo
from alignshift.losses.penalties import PAIR_PENALTY, PENALTIES, PenaltyGradient

__all__ = ["add_penalty", "wdpo_first_order_grads", "wdpo_inputs_and_penalty"]


def wdpo_inputs_and_penalty(graphdef, rest, params, batch, objective: Objective, ref_params=None):
    """Policy inputs plus WDPO's penalty, from ONE policy forward taken through the input
    embeddings: ``g = ∂(Σ_i L_i)/∂e`` by a VJP, ``P_i`` per pair from ``g``'s rows. Returns
    ``(inputs, penalty, P [B])``; differentiating ``penalty`` w.r.t. ``params`` goes through
    ``g`` (reverse-over-reverse), as the authors' ``create_graph=True``."""
    groups = sequence_groups(objective)
    logits_fn = make_logits_fn(graphdef, rest)
    ids, am, lm = (concat_groups(batch, groups, f) for f in ("input_ids", "attention_mask", "loss_mask"))
    ref = reference_logps(logits_fn, batch, groups, ref_params) if "reference" in objective.requires else None
    e = nnx.merge(graphdef, params, rest).embed(ids)

    def per_example(e_):
        logits = nnx.merge(graphdef, params, rest)(inputs_embeds=e_, attention_mask=am)
        fn = sequence_logps_wpo if "wpo_terms" in objective.requires else sequence_logps
        pol = split_groups(fn(logits[:, :-1], ids[:, 1:], lm[:, 1:]), batch, groups)
        inputs = assemble_inputs(pol, ref, batch, objective)
        return objective.terms(inputs)[0].losses, inputs

    losses, vjp_fn, inputs = jax.vjp(per_example, e, has_aux=True)
    (g,) = vjp_fn(jnp.ones_like(losses))
    penalty, p = PENALTIES[objective.penalty](g, losses.shape[0], **objective.penalty_kwargs)
    return inputs, penalty, p


def wdpo_first_order_grads(graphdef, rest, params, batch, objective: Objective, step,
                           gradient: PenaltyGradient, *, with_outputs: bool = False):
    """WDPO's loss, metrics and parameter gradient WITHOUT reverse-over-reverse differentiation.

    With ``S(θ, δ) = Σ_i L_i(θ, e(θ) + δ)`` and ``g = ∂S/∂δ`` at ``δ = 0`` (the per-pair
    embedding gradients), the penalty's gradient is ``∇θP = (∂g/∂θ)ᵀ v`` with ``v = ∂P/∂g``:
    the derivative of ``∇θS(θ, δ)`` in the direction ``δ = v``. Pass 1 gives ``∇θS(0)`` and
    ``g`` from one backward (gradients w.r.t. θ and δ together); pass 2 takes the directional
    derivative, by ``gradient.mode``:

    * ``"forward_over_reverse"`` — exactly, as ``jax.jvp`` of ``δ ↦ ∇θS(θ, δ)`` along ``v``
      (a Hessian-vector product; equal to the double-backprop gradient up to rounding);
    * ``"finite_difference"`` — ``[∇θS(εv) − ∇θS(0)]/ε`` with ``ε = fd_eps·‖e‖/‖v‖``: one
      more first-order pass; truncation error O(fd_eps) relative on the penalty's part of the
      gradient (measured: 3% at ``fd_eps = 1e-3``, 0.3% at ``1e-4`` on the test model).

    With ``gradient.pairs = m > 0`` pass 2 runs on ``m`` pairs drawn each step (a
    permutation keyed by the step counter, so a resumed run draws the same pairs) and the
    directional derivative is a central difference ``[∇θS_m(εv) − ∇θS_m(−εv)]/2ε`` (or the
    jvp) on those pairs, scaled by ``n/m``: an unbiased estimate of the penalty's gradient
    at ``2m/n`` of a full pass's cost instead of one.

    Only for the plain mean objective (``weighting="uniform"``, no data weights, no KL
    completions); reference log-probs must already be in ``batch`` (:func:`attach_reference`).
    Returns ``(loss, metrics, grads)``, and with ``with_outputs`` also the per-example outputs
    (the objective's inputs and the per-pair penalties under ``PAIR_PENALTY``; gradient
    accumulation evaluates the whole batch's objective on them)."""
    kw = objective.penalty_kwargs
    mode = gradient.mode
    if objective.weighting != "uniform" or "kl_completions" in objective.requires or "weight" in batch:
        raise ValueError(f"WDPO penalty gradient mode={mode!r} needs the plain mean objective (weighting 'uniform', "
                         f"no 'weight' column, no KL completions); got weighting {objective.weighting!r}, "
                         f"base {objective.base!r}; use mode='exact'")
    pen_fn = PENALTIES[objective.penalty]
    groups = sequence_groups(objective)
    n = batch[f"{groups[0]}_input_ids"].shape[0]
    m = gradient.pairs
    if m >= n:
        m = 0  # all pairs: the exact one-sided scheme below

    def summed_fn(b):
        ids_, am_, lm_ = (concat_groups(b, groups, f) for f in ("input_ids", "attention_mask", "loss_mask"))
        ref = reference_logps(None, b, groups, None) if "reference" in objective.requires else None

        def summed(p, delta):
            model = nnx.merge(graphdef, p, rest)
            logits = model(inputs_embeds=model.embed(ids_) + delta, attention_mask=am_)
            pol = split_groups(sequence_logps(logits[:, :-1], ids_[:, 1:], lm_[:, 1:]), b, groups)
            inputs = assemble_inputs(pol, ref, b, objective)
            return objective.terms(inputs)[0].losses.sum(), inputs

        e = jax.lax.stop_gradient(nnx.merge(graphdef, params, rest).embed(ids_))
        return summed, e

    norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32))))  # noqa: E731
    summed, e0 = summed_fn(batch)
    (_, inputs), (g_theta, g_e) = jax.value_and_grad(summed, argnums=(0, 1), has_aux=True)(params, jnp.zeros_like(e0))
    penalty, pair_pen = pen_fn(g_e, n, **kw)
    v = jax.grad(lambda g: pen_fn(g, n, **kw)[0])(g_e).astype(e0.dtype)
    if m:
        # pass 2 on m pairs (rows i and n + i of the concatenated groups), scaled by n/m
        idx = jax.random.permutation(jax.random.fold_in(jax.random.key(0x5DB0), step), n)[:m]
        sub = {k: x[idx] for k, x in batch.items() if getattr(x, "ndim", 0) >= 1 and x.shape[0] == n}
        rows = jnp.concatenate([idx + j * n for j in range(len(groups))])
        summed_m, e_m = summed_fn(sub)
        v_m = v[rows]
        grad_m = lambda d: jax.grad(lambda p: summed_m(p, d)[0])(params)  # noqa: E731
        if mode == "forward_over_reverse":
            hvp = jax.jvp(grad_m, (jnp.zeros_like(e_m),), (v_m,))[1]
        else:
            eps = gradient.fd_eps * norm(e_m) / jnp.maximum(norm(v_m), 1e-30)
            gp, gm = grad_m((eps * v_m).astype(e0.dtype)), grad_m((-eps * v_m).astype(e0.dtype))
            hvp = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), gp, gm)
        hvp = jax.tree_util.tree_map(lambda h: h * (n / m), hvp)
    else:
        grad_theta = lambda d: jax.grad(lambda p: summed(p, d)[0])(params)  # noqa: E731
        if mode == "forward_over_reverse":
            hvp = jax.jvp(grad_theta, (jnp.zeros_like(e0),), (v,))[1]
        else:
            eps = gradient.fd_eps * norm(e0) / jnp.maximum(norm(v), 1e-30)
            g2 = grad_theta((eps * v).astype(e0.dtype))
            hvp = jax.tree_util.tree_map(lambda a, b: (b - a) / eps, g_theta, g2)
    outputs = {**jax.lax.stop_gradient(inputs), PAIR_PENALTY: jax.lax.stop_gradient(pair_pen)}
    inputs["step"] = step
    loss, metrics = objective(inputs)
    grads = jax.tree_util.tree_map(lambda a, h: a / n + h, g_theta, hvp)
    loss, metrics = add_penalty(loss, metrics, penalty, pair_pen)
    return (loss, metrics, grads, outputs) if with_outputs else (loss, metrics, grads)


def add_penalty(loss, metrics: dict, penalty, pair_pen):
    """``loss + penalty`` with ``loss/base``, ``penalty`` and ``penalty/pair_max`` logged (no-op without one)."""
    if penalty is None:
        return loss, metrics
    metrics.update({"loss/base": loss, "penalty": penalty, "penalty/pair_max": pair_pen.max()})
    loss = loss + penalty
    metrics["loss"] = loss
    return loss, metrics
