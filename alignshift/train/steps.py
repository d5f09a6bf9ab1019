"""Jitted training steps (SFT and preference), written as pure functions of a state dict.

The model is split once into ``(graphdef, params, rest)``; the steps close over the static
``graphdef``/``rest`` and take ``state = {"step", "params", "opt_state"}``, so the same state
is what orbax saves and what a sharded run places on a mesh.

The preference step is method-agnostic: the forward stage (:mod:`alignshift.forward`) builds
whatever inputs the objective declares it needs (``objective.requires``), a penalty's terms and
gradient come from :mod:`alignshift.train.penalty`, and the objective reduces.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from alignshift.forward import attach_reference, batch_sequence_logps, make_logits_fn, validation_inputs
from alignshift.losses import Objective
from alignshift.losses.penalties import PenaltyGradient
from alignshift.train.accumulate import accumulated_loss_and_grads, check_weighting_scope
from alignshift.train.penalty import add_penalty, penalty_grads, penalty_terms

__all__ = [
    "apply_gradients",
    "init_state",
    "make_preference_step",
    "make_sft_step",
    "step_inputs",
    "tree_size",
]


def init_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def apply_gradients(state, grads, tx, loss=None):
    # the loss goes to the optimiser as optax's ``value`` extra argument: the skip_nonfinite
    # guard of alignshift.train.optim does not apply a step whose loss or gradient is non-finite
    extra = {"value": loss} if loss is not None and isinstance(tx, optax.GradientTransformationExtraArgs) else {}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], **extra)
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}


def make_sft_step(graphdef, rest, tx, *, logits_chunk: int = 0, response_window: int = 0) -> Callable:
    """``step(state, batch) -> (state, metrics)``: mean token NLL over ``loss_mask`` (responses).
    ``logits_chunk > 0``: log-probs chunked over the sequence; ``response_window > 0``: logits
    on the response positions only (:class:`alignshift.forward.LogitsFn`)."""
    logits_fn = make_logits_fn(graphdef, rest, logits_chunk=logits_chunk, response_window=response_window)

    def loss_fn(params, batch):
        s, n = batch_sequence_logps(
            logits_fn, params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
        nll = -s.sum() / jnp.maximum(n.sum(), 1.0)
        return nll, {"loss": nll}

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, batch):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return apply_gradients(state, grads, tx, loss), metrics

    return step


def step_inputs(graphdef, rest, params, batch, objective: Objective, val_batch, step, *, logits_chunk: int = 0,
                response_window: int = 0):
    """The objective's inputs for one step, reference log-probs already in the batch:
    ``(inputs, val_inputs, penalty, pair_penalties)``. With a penalty (WDPO) the policy forward
    goes through the input embeddings (:mod:`alignshift.train.penalty`); the validation batch
    (rules that require ``"val_batch"``) gives detached features only."""
    logits_fn = make_logits_fn(graphdef, rest, logits_chunk=logits_chunk, response_window=response_window)
    inputs, penalty, pair_pen = penalty_terms(graphdef, rest, params, batch, objective, logits_fn)
    inputs["step"] = step
    return inputs, validation_inputs(logits_fn, params, val_batch, objective), penalty, pair_pen


def make_preference_step(graphdef, rest, tx, objective: Objective, *, logits_chunk: int = 0,
                         response_window: int = 0, penalty_gradient: PenaltyGradient | None = None,
                         grad_accum_steps: int = 1, weighting_scope: str = "global") -> Callable:
    """``step(state, batch, ref_params=None, val_batch=None, frozen=None) -> (state, metrics)``.

    With ``ref_params=None`` the reference log-probs must be precomputed in the batch;
    otherwise the frozen reference (same graphdef) runs forward inside the step. Rules that
    require a deployment/validation batch (``"val_batch" in objective.requires``) get ``val_batch``: it goes
    through the policy (and reference) forward for features only — it carries no gradient
    and does not enter the loss. ``inputs["step"]`` (the state's step) is passed to the rule,
    e.g. for a warm-up.

    ``frozen`` (optional) replaces the ``rest`` the step was built with, as a traced argument:
    pass the frozen base weights this way under LoRA (``rest`` of
    :func:`alignshift.models.lora.split_lora`), so they are an input the mesh can shard
    (:func:`alignshift.parallel.make_sharded_step` shards a parameter tree by the rule table)
    instead of constants baked into the compiled step.

    ``logits_chunk > 0`` computes the log-probs ``logits_chunk`` positions at a time from the
    final hidden states (:func:`alignshift.losses.logps.chunked_sequence_logps`): the
    ``[B, T, V]`` logits are never materialised, in the forward or the backward.

    ``response_window > 0`` runs the LM head and log-softmax (policy and in-step reference) on
    that many positions per sequence, from the first response token on, instead of all ``T``
    (:class:`alignshift.forward.LogitsFn`; use ``data.max_completion_len``). Same loss; less work when prompts
    are a large part of the sequence.

    ``penalty_gradient`` (:class:`~alignshift.losses.penalties.PenaltyGradient`, default exact):
    how a penalty's parameter gradient is taken (WDPO: double backprop, or first-order passes).

    ``grad_accum_steps = k > 1`` runs the batch as ``k`` equal micro-batches (one at a time) and
    takes ONE optimiser step with the whole batch's gradient; ``weighting_scope`` says what a
    batch-coupled rule reduces over (``"global"``: the whole batch, exactly as ``k = 1``;
    ``"micro_batch"``: each micro-batch is its own batch). See :mod:`alignshift.train.accumulate`.
    The metrics are the whole batch's (``"micro_batch"``: the micro-batches' mean).
    """
    k = int(grad_accum_steps)
    if k < 1:
        raise ValueError(f"grad_accum_steps must be >= 1; got {grad_accum_steps}")
    check_weighting_scope(weighting_scope)

    def loss_fn(params, batch, val_batch, step, rest_):
        inputs, val_inputs, penalty, pair_pen = step_inputs(graphdef, rest_, params, batch, objective, val_batch, step,
                                                            logits_chunk=logits_chunk, response_window=response_window)
        loss, metrics = objective(inputs, val_inputs)
        return add_penalty(loss, metrics, penalty, pair_pen)

    def backprop(rest_, params, batch, val_batch, step):
        (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, val_batch, step, rest_)
        return loss, metrics, grads

    # a penalty's first-order gradient, or None; accumulation also needs its per-example outputs
    custom = penalty_grads(objective, penalty_gradient, with_outputs=k > 1)
    loss_and_grads = backprop if custom is None else (
        lambda rest_, params, batch, val_batch, step: custom(graphdef, rest_, params, batch, step))

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, batch, ref_params=None, val_batch=None, frozen=None):
        rest_ = rest if frozen is None else frozen
        logits_fn = make_logits_fn(graphdef, rest_, logits_chunk=logits_chunk, response_window=response_window)
        if k > 1:
            loss, metrics, grads = accumulated_loss_and_grads(
                graphdef, rest_, state["params"], batch, val_batch, ref_params, state["step"], objective=objective,
                logits_fn=logits_fn, k=k, scope=weighting_scope, custom=custom)
            metrics["grad_norm"] = optax.tree.norm(grads)
            return apply_gradients(state, grads, tx, loss), metrics
        batch = attach_reference(logits_fn, batch, objective, ref_params)
        val_batch = attach_reference(logits_fn, val_batch, objective, ref_params)
        loss, metrics, grads = loss_and_grads(rest_, state["params"], batch, val_batch, state["step"])
        metrics["grad_norm"] = optax.tree.norm(grads)
        return apply_gradients(state, grads, tx, loss), metrics

    return step


def tree_size(tree: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))
