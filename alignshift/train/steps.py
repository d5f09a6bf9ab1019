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
    ``logits_chunk > 0`` (the ``[B, T, V]`` logits are never materialised).

    ``response_window = W > 0``: the LM head and the log-softmax run on ``W`` positions per
    sequence only (from each row's first response token on) instead of all ``T``: prompt
    positions need no logits. Same values: the other positions contribute exactly 0. ``W``
    must cover every response (``data.max_completion_len`` does: the encoder truncates
    responses to it). A row whose loss mask reaches past its window gets a NaN log-prob, so
    the step is skipped and logged by the non-finite guard; the sum is never silently
    truncated."""

    def __init__(self, graphdef, rest, logits_chunk: int = 0, response_window: int = 0):
        if int(response_window) < 0:
            raise ValueError(f"response_window must be >= 0 (0 = off), got {response_window}")
        self.graphdef, self.rest = graphdef, rest
        self.logits_chunk, self.response_window = int(logits_chunk), int(response_window)

    def __call__(self, params, input_ids, attention_mask):
        model = nnx.merge(self.graphdef, params, self.rest)
        return model(input_ids, attention_mask=attention_mask)

    def sequence_logps(self, params, input_ids, attention_mask, loss_mask, with_wpo: bool = False):
        labels, lmask = input_ids[:, 1:], loss_mask[:, 1:]
        window = self.response_window if 0 < self.response_window < labels.shape[1] else 0
        if self.logits_chunk <= 0 and not window:
            logits = self(params, input_ids, attention_mask)
            fn = sequence_logps_wpo if with_wpo else sequence_logps
            return fn(logits[:, :-1], labels, lmask)
        model = nnx.merge(self.graphdef, params, self.rest)
        h = model.hidden_states(input_ids, attention_mask=attention_mask)[:, :-1]
        dropped, n_tokens = None, lmask.astype(jnp.float32).sum(axis=-1)
        if window:
            h, labels, lmask, dropped = response_windows(h, labels, lmask, window)
        if self.logits_chunk > 0:
            out = chunked_sequence_logps(h, model.logits_from_hidden, labels, lmask,
                                         chunk_size=self.logits_chunk, with_wpo=with_wpo)
        else:
            fn = sequence_logps_wpo if with_wpo else sequence_logps
            out = fn(model.logits_from_hidden(h), labels, lmask)
        if dropped is None:
            return out
        return (jnp.where(dropped, jnp.nan, out[0]), n_tokens) + tuple(out[2:])


def response_windows(hidden, labels, mask, window: int):
    """Per row, the ``window`` positions from the first ``mask`` position on (clipped to the
    end): ``(hidden [B, W, d], labels [B, W], mask [B, W], dropped [B] bool)``; ``dropped``
    marks rows with mask positions outside their window."""
    T = labels.shape[1]
    m = mask.astype(jnp.int32)
    start = jnp.minimum(jnp.argmax(m, axis=1), T - window).astype(jnp.int32)

    def cut(x):
        return jax.vmap(lambda row, s: jax.lax.dynamic_slice_in_dim(row, s, window, axis=0))(x, start)

    wmask = cut(m)
    dropped = wmask.sum(axis=1) != m.sum(axis=1)
    return cut(hidden), cut(labels), wmask.astype(mask.dtype), dropped


def make_logits_fn(graphdef, rest, *, logits_chunk: int = 0, response_window: int = 0) -> LogitsFn:
    """``logits_fn(params, input_ids, attention_mask) -> logits [B, T, V]`` (pure); see
    :class:`LogitsFn` for ``logits_chunk`` and ``response_window``."""
    return LogitsFn(graphdef, rest, logits_chunk, response_window)


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
    _passthrough(batch, inputs)
    return inputs


# Per-example data columns the objective reads as they are: data weights, and DoRA's
# per-response classifier outputs ([B, K]; alignshift.rewards.source_classifier).
PASSTHROUGH_KEYS = ("weight", "source_prob", "source_share")


def _passthrough(batch, inputs: dict) -> None:
    for k in PASSTHROUGH_KEYS:
        if k in batch:
            inputs[k] = batch[k]


# ---- listwise (K candidates per prompt) layout, for objectives with a listwise base (PL, RRHF,
# LIRE): ``cand_{input_ids,attention_mask,loss_mask}`` [B, K, T], ``cand_scores`` [B, K] (the
# judge's rewards), optional precomputed ``reference_cand_logps`` [B, K]; the B·K sequences go
# through the model in ONE forward (flattened on the batch axis). Built by
# alignshift.data.encode.encode_lists. Pairwise batches keep the path above, unchanged.
def is_list_batch(objective: Objective, batch) -> bool:
    return bool(getattr(objective, "listwise", False)) and batch is not None and "cand_input_ids" in batch


def _list_logps(logits_fn, params, batch):
    ids = batch["cand_input_ids"]
    B, K, T = ids.shape
    flat = [batch[f"cand_{f}"].reshape(B * K, T) for f in ("input_ids", "attention_mask", "loss_mask")]
    s, n = batch_sequence_logps(logits_fn, params, *flat)
    return s.reshape(B, K), n.reshape(B, K)


def list_inputs(logits_fn, params, batch, objective: Objective, ref_params=None) -> dict:
    """The listwise objective's inputs: ``policy_logps``, ``n_tokens``, ``scores``,
    ``reference_logps`` (from the batch or a reference forward), all ``[B, K]``."""
    s, n = _list_logps(logits_fn, params, batch)
    inputs = {"policy_logps": s, "n_tokens": n}
    if "cand_scores" in batch:
        inputs["scores"] = batch["cand_scores"]
    if objective.needs_reference:
        if ref_params is not None:
            inputs["reference_logps"] = jax.lax.stop_gradient(_list_logps(logits_fn, ref_params, batch)[0])
        elif "reference_cand_logps" in batch:
            inputs["reference_logps"] = jax.lax.stop_gradient(batch["reference_cand_logps"])
        else:
            raise ValueError("listwise batch lacks precomputed 'reference_cand_logps' and no reference params were given")
    _passthrough(batch, inputs)
    return inputs


def policy_inputs(logits_fn, params, batch, objective: Objective, ref_params=None) -> dict:
    """The objective's input dict for one batch (policy forward, reference from batch or model)."""
    if is_list_batch(objective, batch):
        return list_inputs(logits_fn, params, batch, objective, ref_params)
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


def wdpo_first_order_grads(graphdef, rest, params, batch, objective: Objective, step):
    """WDPO's loss, metrics and parameter gradient WITHOUT reverse-over-reverse differentiation.

    With ``S(θ, δ) = Σ_i L_i(θ, e(θ) + δ)`` and ``g = ∂S/∂δ`` at ``δ = 0`` (the per-pair
    embedding gradients), the penalty's gradient is ``∇θP = (∂g/∂θ)ᵀ v`` with ``v = ∂P/∂g``:
    the derivative of ``∇θS(θ, δ)`` in the direction ``δ = v``. Pass 1 gives ``∇θS(0)`` and
    ``g`` from one backward (gradients w.r.t. θ and δ together); pass 2 takes the directional
    derivative, by ``penalty_kwargs["gradient"]``:

    * ``"forward_over_reverse"`` — exactly, as ``jax.jvp`` of ``δ ↦ ∇θS(θ, δ)`` along ``v``
      (a Hessian-vector product; equal to the double-backprop gradient up to rounding);
    * ``"finite_difference"`` — ``[∇θS(εv) − ∇θS(0)]/ε`` with ``ε = fd_eps·‖e‖/‖v‖``: one
      more first-order pass; truncation error O(fd_eps) relative on the penalty's part of the
      gradient (measured: 3% at ``fd_eps = 1e-3``, 0.3% at ``1e-4`` on the test model).

    With ``penalty_kwargs["pairs"] = m > 0`` pass 2 runs on ``m`` pairs drawn each step (a
    permutation keyed by the step counter, so a resumed run draws the same pairs) and the
    directional derivative is a central difference ``[∇θS_m(εv) − ∇θS_m(−εv)]/2ε`` (or the
    jvp) on those pairs, scaled by ``n/m``: an unbiased estimate of the penalty's gradient
    at ``2m/n`` of a full pass's cost instead of one.

    Only for the plain mean objective (``weighting="uniform"``, no data weights, no KL
    completions); reference log-probs must already be in ``batch`` (:func:`attach_reference`).
    Returns ``(loss, metrics, grads)``."""
    from alignshift.losses.penalties import PENALTIES

    kw = objective.penalty_kwargs
    mode = kw.get("gradient", "exact")
    if objective.weighting != "uniform" or objective.needs_kl_completions or "weight" in batch:
        raise ValueError(f"WDPO gradient={mode!r} needs the plain mean objective (weighting 'uniform', "
                         f"no 'weight' column, no KL completions); got weighting {objective.weighting!r}, "
                         f"base {objective.base!r}; use gradient='exact'")
    pen_fn = PENALTIES[objective.penalty]
    groups = _sequence_groups(objective)
    n = batch[f"{groups[0]}_input_ids"].shape[0]
    m = int(kw.get("pairs", 0) or 0)
    if m >= n:
        m = 0  # all pairs: the exact one-sided scheme below

    def summed_fn(b):
        ids_, am_, lm_ = (_concat(b, groups, f) for f in ("input_ids", "attention_mask", "loss_mask"))
        ref = _reference(None, b, objective, groups, None) if objective.needs_reference else None

        def summed(p, delta):
            model = nnx.merge(graphdef, p, rest)
            logits = model(inputs_embeds=model.embed(ids_) + delta, attention_mask=am_)
            pol = _split_groups(sequence_logps(logits[:, :-1], ids_[:, 1:], lm_[:, 1:]), b, groups)
            inputs = _assemble(pol, ref, b, objective)
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
            eps = kw.get("fd_eps", 1e-4) * norm(e_m) / jnp.maximum(norm(v_m), 1e-30)
            gp, gm = grad_m((eps * v_m).astype(e0.dtype)), grad_m((-eps * v_m).astype(e0.dtype))
            hvp = jax.tree_util.tree_map(lambda a, b: (a - b) / (2 * eps), gp, gm)
        hvp = jax.tree_util.tree_map(lambda h: h * (n / m), hvp)
    else:
        grad_theta = lambda d: jax.grad(lambda p: summed(p, d)[0])(params)  # noqa: E731
        if mode == "forward_over_reverse":
            hvp = jax.jvp(grad_theta, (jnp.zeros_like(e0),), (v,))[1]
        else:
            eps = kw.get("fd_eps", 1e-4) * norm(e0) / jnp.maximum(norm(v), 1e-30)
            g2 = grad_theta((eps * v).astype(e0.dtype))
            hvp = jax.tree_util.tree_map(lambda a, b: (b - a) / eps, g_theta, g2)
    inputs["step"] = step
    loss, metrics = objective(inputs)
    grads = jax.tree_util.tree_map(lambda a, h: a / n + h, g_theta, hvp)
    loss, metrics = add_penalty(loss, metrics, penalty, pair_pen)
    return loss, metrics, grads


def init_state(params, tx: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def _apply(state, grads, tx, loss=None):
    # the loss goes to the optimiser as optax's ``value`` extra argument: the skip_nonfinite
    # guard of alignshift.train.optim does not apply a step whose loss or gradient is non-finite
    extra = {"value": loss} if loss is not None and isinstance(tx, optax.GradientTransformationExtraArgs) else {}
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"], **extra)
    params = optax.apply_updates(state["params"], updates)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}


def make_sft_step(graphdef, rest, tx, *, logits_chunk: int = 0, response_window: int = 0) -> Callable:
    """``step(state, batch) -> (state, metrics)``: mean token NLL over ``loss_mask`` (responses).
    ``logits_chunk > 0``: log-probs chunked over the sequence; ``response_window > 0``: logits
    on the response positions only (:class:`LogitsFn`)."""
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
        return _apply(state, grads, tx, loss), metrics

    return step


def attach_reference(logits_fn, batch, objective: Objective, ref_params):
    """``batch`` plus ``reference_{g}_logps`` from a frozen-reference forward (unchanged when
    ``ref_params`` is None or the loss is reference-free). Call it OUTSIDE ``value_and_grad``:
    there is nothing to differentiate, and ``nnx.remat`` inside a foreign trace level fails."""
    if batch is None or ref_params is None or not objective.needs_reference:
        return batch
    if is_list_batch(objective, batch):
        ref = jax.lax.stop_gradient(_list_logps(logits_fn, ref_params, batch)[0])
        return {**batch, "reference_cand_logps": ref}
    ref = _reference(logits_fn, batch, objective, _sequence_groups(objective), ref_params)
    return {**batch, **{f"reference_{g}_logps": v for g, v in ref.items()}}


def step_inputs(graphdef, rest, params, batch, objective: Objective, val_batch, step, *, logits_chunk: int = 0,
                response_window: int = 0):
    """The objective's inputs for one step, reference log-probs already in the batch:
    ``(inputs, val_inputs, penalty, pair_penalties)``. With a penalty (WDPO) the policy forward
    goes through the input embeddings (never chunked or windowed); the validation batch (rules
    with ``needs_val``) gives detached features only."""
    logits_fn = make_logits_fn(graphdef, rest, logits_chunk=logits_chunk, response_window=response_window)
    penalty = pair_pen = None
    if objective.penalty is not None:
        if is_list_batch(objective, batch):
            raise ValueError(f"penalty {objective.penalty!r} is not supported with listwise batches")
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


def make_preference_step(graphdef, rest, tx, objective: Objective, *, logits_chunk: int = 0,
                         response_window: int = 0) -> Callable:
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

    ``response_window > 0`` runs the LM head and log-softmax (policy and in-step reference) on
    that many positions per sequence, from the first response token on, instead of all ``T``
    (:class:`LogitsFn`; use ``data.max_completion_len``). Same loss; less work when prompts
    are a large part of the sequence.
    """

    first_order_penalty = (objective.penalty is not None
                           and objective.penalty_kwargs.get("gradient", "exact") != "exact")

    def loss_fn(params, batch, val_batch, step, rest_):
        inputs, val_inputs, penalty, pair_pen = step_inputs(graphdef, rest_, params, batch, objective, val_batch, step,
                                                            logits_chunk=logits_chunk, response_window=response_window)
        loss, metrics = objective(inputs, val_inputs)
        return add_penalty(loss, metrics, penalty, pair_pen)

    @partial(jax.jit, donate_argnums=(0,))
    def step(state, batch, ref_params=None, val_batch=None, frozen=None):
        rest_ = rest if frozen is None else frozen
        logits_fn = make_logits_fn(graphdef, rest_, logits_chunk=logits_chunk, response_window=response_window)
        batch = attach_reference(logits_fn, batch, objective, ref_params)
        val_batch = attach_reference(logits_fn, val_batch, objective, ref_params)
        if first_order_penalty:
            loss, metrics, grads = wdpo_first_order_grads(graphdef, rest_, state["params"], batch, objective,
                                                                state["step"])
        else:
            (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
                state["params"], batch, val_batch, state["step"], rest_
            )
        metrics["grad_norm"] = optax.tree.norm(grads)
        return _apply(state, grads, tx, loss), metrics

    return step


def tree_size(tree: Any) -> int:
    return sum(x.size for x in jax.tree_util.tree_leaves(tree))
