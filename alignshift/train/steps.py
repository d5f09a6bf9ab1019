"""Jitted training steps (SFT and preference), written as pure functions of a state dict.

The model is split once into ``(graphdef, params, rest)``; the steps close over the static
``graphdef``/``rest`` and take ``state = {"step", "params", "opt_state"}``, so the same state
is what orbax saves and what a sharded run places on a mesh.

Preference batches use the layout of :func:`alignshift.data.encode.encode_pairs`:
``{chosen,rejected,kl}_{input_ids,attention_mask,loss_mask}`` ([B, T]); chosen, rejected (and,
for KTO, the mismatched ``kl`` completions) go through the policy in ONE forward pass,
concatenated along the batch axis. Reference log-probs come either precomputed in the batch
(``reference_{chosen,rejected,kl}_logps``) or from a frozen reference forward in the step.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from alignshift.losses import Objective, sequence_logps
from alignshift.losses.logps import chunked_sequence_logps, sequence_logps_wpo

__all__ = [
    "split_model",
    "make_logits_fn",
    "batch_sequence_logps",
    "policy_inputs",
    "init_state",
    "make_sft_step",
    "make_preference_step",
]


def split_model(model: nnx.Module):
    """``(graphdef, params, rest)``: trainable ``nnx.Param`` leaves and everything else."""
    return nnx.split(model, nnx.Param, ...)


class LogitsFn:
    """``logits_fn(params, input_ids, attention_mask) -> logits [B, T, V]`` (pure), plus
    ``logits_fn.sequence_logps(params, ids, mask, loss_mask, with_wpo)``: the per-sequence
    log-probs, through :func:`alignshift.losses.logps.chunked_sequence_logps` when
    ``logits_chunk > 0`` (the ``[B, T, V]`` logits are never materialised)."""

    def __init__(self, graphdef, rest, logits_chunk: int = 0):
        self.graphdef, self.rest, self.logits_chunk = graphdef, rest, int(logits_chunk)

    def __call__(self, params, input_ids, attention_mask):
        model = nnx.merge(self.graphdef, params, self.rest)
        return model(input_ids, attention_mask=attention_mask)

    def sequence_logps(self, params, input_ids, attention_mask, loss_mask, with_wpo: bool = False):
        labels, lmask = input_ids[:, 1:], loss_mask[:, 1:]
        if self.logits_chunk <= 0:
            logits = self(params, input_ids, attention_mask)
            fn = sequence_logps_wpo if with_wpo else sequence_logps
            return fn(logits[:, :-1], labels, lmask)
        model = nnx.merge(self.graphdef, params, self.rest)
        h = model.hidden_states(input_ids, attention_mask=attention_mask)
        return chunked_sequence_logps(h[:, :-1], model.logits_from_hidden, labels, lmask,
                                      chunk_size=self.logits_chunk, with_wpo=with_wpo)


def make_logits_fn(graphdef, rest, *, logits_chunk: int = 0) -> LogitsFn:
    """``logits_fn(params, input_ids, attention_mask) -> logits [B, T, V]`` (pure); see
    :class:`LogitsFn` for ``logits_chunk``."""
    return LogitsFn(graphdef, rest, logits_chunk)


def batch_sequence_logps(logits_fn, params, input_ids, attention_mask, loss_mask, *, with_wpo: bool = False):
    """Per-sequence ``(sum_logps, n_tokens)`` of the response tokens (next-token shift inside);
    with ``with_wpo`` also WPO's per-sequence log-weight term (a third output). ``logits_fn``
    is a :class:`LogitsFn` (chunked when configured) or any ``(params, ids, mask) -> logits``."""
    if isinstance(logits_fn, LogitsFn):
        return logits_fn.sequence_logps(params, input_ids, attention_mask, loss_mask, with_wpo)
    logits = logits_fn(params, input_ids, attention_mask)
    fn = sequence_logps_wpo if with_wpo else sequence_logps
    return fn(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


def _sequence_groups(objective: Objective) -> tuple[str, ...]:
    return ("chosen", "rejected", "kl") if objective.needs_kl_completions else ("chosen", "rejected")


def _concat(batch, groups, field):
    return jnp.concatenate([batch[f"{g}_{field}"] for g in groups], axis=0)


def _split_groups(outs, batch, groups) -> dict:
    sizes = [batch[f"{g}_input_ids"].shape[0] for g in groups]
    offsets = [0]
    for k in sizes:
        offsets.append(offsets[-1] + k)
    return {g: tuple(o[a:b] for o in outs) for g, a, b in zip(groups, offsets[:-1], offsets[1:])}


def _concat_logps(logits_fn, params, batch, groups, with_wpo=False):
    """One forward over the groups concatenated on the batch axis -> {group: outputs}."""
    outs = batch_sequence_logps(
        logits_fn,
        params,
        _concat(batch, groups, "input_ids"),
        _concat(batch, groups, "attention_mask"),
        _concat(batch, groups, "loss_mask"),
        with_wpo=with_wpo,
    )
    return _split_groups(outs, batch, groups)


def _reference(logits_fn, batch, objective, groups, ref_params) -> dict:
    if ref_params is None:
        missing = [f"reference_{g}_logps" for g in groups if f"reference_{g}_logps" not in batch]
        if missing:
            raise ValueError(f"batch lacks precomputed {missing} and no reference params were given")
        return {g: jax.lax.stop_gradient(batch[f"reference_{g}_logps"]) for g in groups}
    r = _concat_logps(logits_fn, ref_params, batch, groups)
    return {g: jax.lax.stop_gradient(r[g][0]) for g in groups}


def _assemble(pol: dict, ref: dict | None, batch, objective: Objective) -> dict:
    inputs = {
        "policy_chosen_logps": pol["chosen"][0],
        "policy_rejected_logps": pol["rejected"][0],
        "chosen_n_tokens": pol["chosen"][1],
        "rejected_n_tokens": pol["rejected"][1],
    }
    if objective.needs_wpo:
        inputs["policy_chosen_wpo"] = pol["chosen"][2]
        inputs["policy_rejected_wpo"] = pol["rejected"][2]
    if "kl" in pol:
        inputs["policy_kl_logps"] = pol["kl"][0]
    for g, v in (ref or {}).items():
        inputs[f"reference_{g}_logps"] = v
    if "weight" in batch:
        inputs["weight"] = batch["weight"]
    return inputs


def policy_inputs(logits_fn, params, batch, objective: Objective, ref_params=None) -> dict:
    """The objective's input dict for one batch (policy forward, reference from batch or model)."""
    groups = _sequence_groups(objective)
    pol = _concat_logps(logits_fn, params, batch, groups, with_wpo=objective.needs_wpo)
    ref = _reference(logits_fn, batch, objective, groups, ref_params) if objective.needs_reference else None
    return _assemble(pol, ref, batch, objective)


def wdpo_inputs_and_penalty(graphdef, rest, params, batch, objective: Objective, ref_params=None):
    """Policy inputs plus WDPO's penalty, from ONE policy forward taken through the input
    embeddings: ``g = ∂(Σ_i L_i)/∂e`` by a VJP, ``P_i`` per pair from ``g``'s rows. Returns
    ``(inputs, penalty, P [B])``; differentiating ``penalty`` w.r.t. ``params`` goes through
    ``g`` (reverse-over-reverse), as the authors' ``create_graph=True``."""
    from alignshift.losses.penalties import PENALTIES

    groups = _sequence_groups(objective)
    logits_fn = make_logits_fn(graphdef, rest)
    ids, am, lm = (_concat(batch, groups, f) for f in ("input_ids", "attention_mask", "loss_mask"))
    ref = _reference(logits_fn, batch, objective, groups, ref_params) if objective.needs_reference else None
    e = nnx.merge(graphdef, params, rest).embed(ids)

    def per_example(e_):
        logits = nnx.merge(graphdef, params, rest)(inputs_embeds=e_, attention_mask=am)
        fn = sequence_logps_wpo if objective.needs_wpo else sequence_logps
        pol = _split_groups(fn(logits[:, :-1], ids[:, 1:], lm[:, 1:]), batch, groups)
        inputs = _assemble(pol, ref, batch, objective)
        return objective.terms(inputs)[0].losses, inputs

    losses, vjp_fn, inputs = jax.vjp(per_example, e, has_aux=True)
    (g,) = vjp_fn(jnp.ones_like(losses))
    penalty, p = PENALTIES[objective.penalty](g, losses.shape[0], **objective.penalty_kwargs)
    return inputs, penalty, p


def init_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def _apply(state, grads, tx):
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}


def make_sft_step(graphdef, rest, tx, *, logits_chunk: int = 0) -> Callable:
    """``step(state, batch) -> (state, metrics)``: mean token NLL over ``loss_mask`` (responses).
    ``logits_chunk > 0``: log-probs chunked over the sequence (:class:`LogitsFn`)."""
    logits_fn = make_logits_fn(graphdef, rest, logits_chunk=logits_chunk)

    def loss_fn(params, batch):
        s, n = batch_sequence_logps(
            logits_fn, params, batch["input_ids"], batch["attention_mask"], batch["loss_mask"]
        )
        nll = -s.sum() / jnp.maximum(n.sum(), 1.0)
        return nll, {"loss": nll}

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return _apply(state, grads, tx), metrics

    return step


def attach_reference(logits_fn, batch, objective: Objective, ref_params):
    """``batch`` plus ``reference_{g}_logps`` from a frozen-reference forward (unchanged when
    ``ref_params`` is None or the loss is reference-free). Call it OUTSIDE ``value_and_grad``:
    there is nothing to differentiate, and ``nnx.remat`` inside a foreign trace level fails."""
    if batch is None or ref_params is None or not objective.needs_reference:
        return batch
    ref = _reference(logits_fn, batch, objective, _sequence_groups(objective), ref_params)
    return {**batch, **{f"reference_{g}_logps": v for g, v in ref.items()}}


def step_inputs(graphdef, rest, params, batch, objective: Objective, val_batch, step, *, logits_chunk: int = 0):
    """The objective's inputs for one step, reference log-probs already in the batch:
    ``(inputs, val_inputs, penalty, pair_penalties)``. With a penalty (WDPO) the policy forward
    goes through the input embeddings (never chunked); the validation batch (rules with
    ``needs_val``) gives detached features only."""
    logits_fn = make_logits_fn(graphdef, rest, logits_chunk=logits_chunk)
    penalty = pair_pen = None
    if objective.penalty is not None:
        inputs, penalty, pair_pen = wdpo_inputs_and_penalty(graphdef, rest, params, batch, objective)
    else:
        inputs = policy_inputs(logits_fn, params, batch, objective)
    inputs["step"] = step
    val_inputs = None
    if objective.needs_val:
        if val_batch is None:
            raise ValueError(f"weighting {objective.weighting!r} needs a validation batch (val_batch)")
        val_inputs = jax.lax.stop_gradient(
            policy_inputs(logits_fn, jax.lax.stop_gradient(params), val_batch, objective)
        )
    return inputs, val_inputs, penalty, pair_pen


def add_penalty(loss, metrics: dict, penalty, pair_pen):
    """``loss + penalty`` with ``loss/base``, ``penalty`` and ``penalty/pair_max`` logged (no-op without one)."""
    if penalty is None:
        return loss, metrics
    metrics.update({"loss/base": loss, "penalty": penalty, "penalty/pair_max": pair_pen.max()})
    loss = loss + penalty
    metrics["loss"] = loss
    return loss, metrics


def make_preference_step(graphdef, rest, tx, objective: Objective, *, logits_chunk: int = 0) -> Callable:
    """``step(state, batch, ref_params=None, val_batch=None, frozen=None) -> (state, metrics)``.

    With ``ref_params=None`` the reference log-probs must be precomputed in the batch;
    otherwise the frozen reference (same graphdef) runs forward inside the step. Rules that
    need a deployment/validation batch (``objective.needs_val``) get ``val_batch``: it goes
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
    """

    def loss_fn(params, batch, val_batch, step, rest_):
        inputs, val_inputs, penalty, pair_pen = step_inputs(graphdef, rest_, params, batch, objective, val_batch, step,
                                                            logits_chunk=logits_chunk)
        loss, metrics = objective(inputs, val_inputs)
        return add_penalty(loss, metrics, penalty, pair_pen)

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, batch, ref_params=None, val_batch=None, frozen=None):
        rest_ = rest if frozen is None else frozen
        logits_fn = make_logits_fn(graphdef, rest_, logits_chunk=logits_chunk)
        batch = attach_reference(logits_fn, batch, objective, ref_params)
        val_batch = attach_reference(logits_fn, val_batch, objective, ref_params)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, val_batch, state["step"], rest_
        )
        metrics["grad_norm"] = optax.tree.norm(grads)
        return _apply(state, grads, tx), metrics

    return step


def tree_size(tree: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))
