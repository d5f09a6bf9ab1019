"""The forward stage: model → per-sequence log-probs → the objective's inputs.

Everything that turns a model and a batch into what an :class:`~alignshift.losses.Objective`
reads lives here, for training (:mod:`alignshift.train.steps`), evaluation
(:mod:`alignshift.eval`), the pmap step (:mod:`alignshift.train.pmap`) and the reward
models (:mod:`alignshift.rewards`). It imports models and losses only.

* :class:`LogitsFn` — ``(params, ids, mask) -> logits``, and per-sequence log-probs with the
  optional chunked LM head (``logits_chunk``) and response window (``response_window``);
* :func:`policy_inputs` — the objective's input dict for one batch: one policy forward over
  the batch's sequence groups (chosen, rejected and, when the objective requires
  ``"kl_completions"``, KTO's mismatched ``kl`` completions), concatenated on the batch axis;
  the reference log-probs from the batch or a frozen reference forward; listwise ``cand_*``
  batches flattened to one forward;
* :func:`attach_reference` — precompute a batch's reference log-probs outside the gradient;
* :func:`validation_inputs` — the detached features of a deployment/validation batch;
* :func:`map_batches` — a jitted per-example function over a whole dataset in fixed-size
  padded batches (one compiled shape).

Every function above also takes a **packed** batch (:func:`is_packed`;
:func:`alignshift.data.packing.pack_batch`: ``train.packing`` / ``train.share_prompt``): one
forward over its ``packed_*`` rows (segment ids, positions, shared-prompt branch ids), the LM
head on the ``{g}_target_index`` positions only, and the same per-example outputs as the padded
batch it was packed from.

What the objective needs is read from one declaration, ``objective.requires`` (a set of input
kinds: ``reference``, ``kl_completions``, ``wpo_terms``, ``val_batch``, ``source``, ``lists``).

Batch layout (:func:`alignshift.data.encode.encode_pairs`): ``{chosen,rejected,kl}_{input_ids,
attention_mask,loss_mask}`` ``[B, T]``, optional precomputed ``reference_{g}_logps`` ``[B]``;
listwise (:func:`alignshift.data.encode.encode_lists`): ``cand_{input_ids,attention_mask,
loss_mask}`` ``[B, K, T]``, ``cand_scores`` ``[B, K]``, optional ``reference_cand_logps``.
Packed (:mod:`alignshift.data.packing`): ``packed_{input_ids,segment_ids,positions[,branch_ids]}``
``[R, L]`` and ``{g}_target_{index,ids,mask}`` ``[B, W]`` (``cand``: ``[B, K, W]``) instead of the
groups' token arrays; the per-example arrays unchanged.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from alignshift.losses import Objective, sequence_logps
from alignshift.losses.logps import chunked_sequence_logps, sequence_logps_wpo

__all__ = [
    "PASSTHROUGH_KEYS",
    "LogitsFn",
    "attach_reference",
    "batch_sequence_logps",
    "is_list_batch",
    "is_packed",
    "list_inputs",
    "make_logits_fn",
    "map_batches",
    "packed_sequence_logps",
    "policy_inputs",
    "reference_logps",
    "response_windows",
    "sequence_groups",
    "split_model",
    "validation_inputs",
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
    truncated.

    Packed batches (:meth:`packed_sequence_logps`) generalise the window: the packer lists, per
    sequence, the positions whose logits are needed (``{g}_target_index``, ``data.max_completion_len``
    slots), and the LM head runs on those only, with or without ``response_window``."""

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

    def packed_sequence_logps(self, params, rows, target_index, target_ids, target_mask, with_wpo: bool = False):
        """Per-sequence log-probs of a packed batch: one forward over ``rows``
        (``packed_{input_ids,segment_ids,positions[,branch_ids]}`` [R, L]), the final hidden states
        gathered at ``target_index`` [N, W] (flat ``row * L + column`` of each response token's
        predecessor), the LM head (chunked with ``logits_chunk``) on those N·W positions only.
        Returns ``(sum_logps [N], n_tokens [N])`` (+ WPO's term)."""
        model = nnx.merge(self.graphdef, params, self.rest)
        h = model.hidden_states(rows["packed_input_ids"], positions=rows["packed_positions"],
                                segment_ids=rows["packed_segment_ids"], branch_ids=rows.get("packed_branch_ids"))
        R, L, d = h.shape
        h = jnp.take(h.reshape(R * L, d), target_index, axis=0)  # [N, W, d]
        if self.logits_chunk > 0:
            return chunked_sequence_logps(h, model.logits_from_hidden, target_ids, target_mask,
                                          chunk_size=self.logits_chunk, with_wpo=with_wpo)
        fn = sequence_logps_wpo if with_wpo else sequence_logps
        return fn(model.logits_from_hidden(h), target_ids, target_mask)


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


def is_packed(batch) -> bool:
    """A packed / shared-prompt batch (:mod:`alignshift.data.packing`): it holds ``packed_input_ids``."""
    return batch is not None and "packed_input_ids" in batch


def packed_sequence_logps(logits_fn, params, batch, groups, with_wpo: bool = False) -> dict:
    """``{group: outputs}`` of a packed batch: ONE forward over its rows for all ``groups`` (their
    targets concatenated on the example axis; ``cand`` flattened from ``[B, K, W]``), each group's
    outputs shaped like its examples (``[B]``, or ``[B, K]`` for ``cand``)."""
    if not isinstance(logits_fn, LogitsFn):
        raise TypeError(f"a packed batch needs a LogitsFn (make_logits_fn), got {type(logits_fn).__name__}")
    missing = [f"{g}_target_index" for g in groups if f"{g}_target_index" not in batch]
    if missing:
        raise ValueError(f"packed batch lacks {missing}: it was packed without these sequence groups")
    fields = [[batch[f"{g}_target_{f}"] for g in groups] for f in ("index", "ids", "mask")]
    shapes = [x.shape[:-1] for x in fields[0]]
    flat = [jnp.concatenate([x.reshape(-1, x.shape[-1]) for x in xs], axis=0) for xs in fields]
    rows = {k: batch[k] for k in ("packed_input_ids", "packed_segment_ids", "packed_positions", "packed_branch_ids")
            if k in batch}
    outs = logits_fn.packed_sequence_logps(params, rows, *flat, with_wpo=with_wpo)
    result, a = {}, 0
    for g, shape in zip(groups, shapes):
        n = int(np.prod(shape))
        result[g] = tuple(o[a:a + n].reshape(shape) for o in outs)
        a += n
    return result


def batch_sequence_logps(logits_fn, params, input_ids, attention_mask, loss_mask, *, with_wpo: bool = False):
    """Per-sequence ``(sum_logps, n_tokens)`` of the response tokens (next-token shift inside);
    with ``with_wpo`` also WPO's per-sequence log-weight term (a third output). ``logits_fn``
    is a :class:`LogitsFn` (chunked when configured) or any ``(params, ids, mask) -> logits``."""
    if isinstance(logits_fn, LogitsFn):
        return logits_fn.sequence_logps(params, input_ids, attention_mask, loss_mask, with_wpo)
    logits = logits_fn(params, input_ids, attention_mask)
    fn = sequence_logps_wpo if with_wpo else sequence_logps
    return fn(logits[:, :-1], input_ids[:, 1:], loss_mask[:, 1:])


# ------------------------------------------------------------------ pairwise sequence groups
def sequence_groups(objective: Objective) -> tuple[str, ...]:
    """The batch's sequence groups the objective reads: chosen, rejected (and kl)."""
    return ("chosen", "rejected", "kl") if "kl_completions" in objective.requires else ("chosen", "rejected")


def concat_groups(batch, groups, field):
    """``batch["{g}_{field}"]`` of every group, concatenated on the batch axis."""
    return jnp.concatenate([batch[f"{g}_{field}"] for g in groups], axis=0)


def split_groups(outs, batch, groups) -> dict:
    """Per-row outputs of the concatenated groups -> ``{group: outputs}``."""
    sizes = [batch[f"{g}_input_ids"].shape[0] for g in groups]
    offsets = [0]
    for k in sizes:
        offsets.append(offsets[-1] + k)
    return {g: tuple(o[a:b] for o in outs) for g, a, b in zip(groups, offsets[:-1], offsets[1:])}


def group_logps(logits_fn, params, batch, groups, with_wpo=False) -> dict:
    """One forward over the groups concatenated on the batch axis -> ``{group: outputs}`` (a packed
    batch: one forward over its rows, :func:`packed_sequence_logps`)."""
    if is_packed(batch):
        return packed_sequence_logps(logits_fn, params, batch, groups, with_wpo=with_wpo)
    outs = batch_sequence_logps(
        logits_fn,
        params,
        concat_groups(batch, groups, "input_ids"),
        concat_groups(batch, groups, "attention_mask"),
        concat_groups(batch, groups, "loss_mask"),
        with_wpo=with_wpo,
    )
    return split_groups(outs, batch, groups)


def reference_logps(logits_fn, batch, groups, ref_params) -> dict:
    """``{group: reference log-probs}`` (detached): from the batch's precomputed
    ``reference_{g}_logps`` when ``ref_params`` is None, else a frozen-reference forward."""
    if ref_params is None:
        missing = [f"reference_{g}_logps" for g in groups if f"reference_{g}_logps" not in batch]
        if missing:
            raise ValueError(f"batch lacks precomputed {missing} and no reference params were given")
        return {g: jax.lax.stop_gradient(batch[f"reference_{g}_logps"]) for g in groups}
    r = group_logps(logits_fn, ref_params, batch, groups)
    return {g: jax.lax.stop_gradient(r[g][0]) for g in groups}


def assemble_inputs(pol: dict, ref: dict | None, batch, objective: Objective) -> dict:
    """The objective's input dict from per-group policy outputs and reference log-probs."""
    inputs = {
        "policy_chosen_logps": pol["chosen"][0],
        "policy_rejected_logps": pol["rejected"][0],
        "chosen_n_tokens": pol["chosen"][1],
        "rejected_n_tokens": pol["rejected"][1],
    }
    if "wpo_terms" in objective.requires:
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


# ------------------------------------------------------------------ listwise (K candidates)
def is_list_batch(objective: Objective, batch) -> bool:
    """A listwise objective given a ``cand_*`` batch, padded or packed (pairwise batches keep the
    pair path)."""
    return ("lists" in objective.requires and batch is not None
            and ("cand_input_ids" in batch or "cand_target_index" in batch))


def _list_logps(logits_fn, params, batch):
    if is_packed(batch):
        return packed_sequence_logps(logits_fn, params, batch, ("cand",))["cand"][:2]
    ids = batch["cand_input_ids"]
    B, K, T = ids.shape
    flat = [batch[f"cand_{f}"].reshape(B * K, T) for f in ("input_ids", "attention_mask", "loss_mask")]
    s, n = batch_sequence_logps(logits_fn, params, *flat)
    return s.reshape(B, K), n.reshape(B, K)


def list_inputs(logits_fn, params, batch, objective: Objective, ref_params=None) -> dict:
    """The listwise objective's inputs: ``policy_logps``, ``n_tokens``, ``scores``,
    ``reference_logps`` (from the batch or a reference forward), all ``[B, K]``; the ``B·K``
    sequences go through the model in ONE forward (flattened on the batch axis)."""
    s, n = _list_logps(logits_fn, params, batch)
    inputs = {"policy_logps": s, "n_tokens": n}
    if "cand_scores" in batch:
        inputs["scores"] = batch["cand_scores"]
    if "reference" in objective.requires:
        if ref_params is not None:
            inputs["reference_logps"] = jax.lax.stop_gradient(_list_logps(logits_fn, ref_params, batch)[0])
        elif "reference_cand_logps" in batch:
            inputs["reference_logps"] = jax.lax.stop_gradient(batch["reference_cand_logps"])
        else:
            raise ValueError("listwise batch lacks precomputed 'reference_cand_logps' and no reference params were given")
    _passthrough(batch, inputs)
    return inputs


# ------------------------------------------------------------------ the objective's inputs
def policy_inputs(logits_fn, params, batch, objective: Objective, ref_params=None) -> dict:
    """The objective's input dict for one batch (policy forward, reference from batch or model)."""
    if is_list_batch(objective, batch):
        return list_inputs(logits_fn, params, batch, objective, ref_params)
    groups = sequence_groups(objective)
    pol = group_logps(logits_fn, params, batch, groups, with_wpo="wpo_terms" in objective.requires)
    ref = reference_logps(logits_fn, batch, groups, ref_params) if "reference" in objective.requires else None
    return assemble_inputs(pol, ref, batch, objective)


def attach_reference(logits_fn, batch, objective: Objective, ref_params):
    """``batch`` plus ``reference_{g}_logps`` from a frozen-reference forward (unchanged when
    ``ref_params`` is None or the loss is reference-free). Call it OUTSIDE ``value_and_grad``:
    there is nothing to differentiate, and ``nnx.remat`` inside a foreign trace level fails."""
    if batch is None or ref_params is None or "reference" not in objective.requires:
        return batch
    if is_list_batch(objective, batch):
        ref = jax.lax.stop_gradient(_list_logps(logits_fn, ref_params, batch)[0])
        return {**batch, "reference_cand_logps": ref}
    ref = reference_logps(logits_fn, batch, sequence_groups(objective), ref_params)
    return {**batch, **{f"reference_{g}_logps": v for g, v in ref.items()}}


def validation_inputs(logits_fn, params, val_batch, objective: Objective):
    """Detached features of the deployment/validation batch, for rules that require
    ``"val_batch"`` (None otherwise): it carries no gradient and does not enter the loss."""
    if "val_batch" not in objective.requires:
        return None
    if val_batch is None:
        raise ValueError(f"weighting {objective.weighting!r} needs a validation batch (val_batch)")
    return jax.lax.stop_gradient(policy_inputs(logits_fn, jax.lax.stop_gradient(params), val_batch, objective))


# ------------------------------------------------------------------ whole datasets
def map_batches(fn: Callable, arrays: Mapping[str, np.ndarray] | Sequence[np.ndarray], *, batch_size: int,
                args: tuple = ()):
    """``fn(*args, batch)`` over ``arrays`` (a dict or a sequence of arrays with the same
    leading axis N) in batches of exactly ``batch_size`` rows (the last one zero-padded), so a
    jitted ``fn`` compiles once; its per-row outputs are trimmed and concatenated over the N
    rows. ``batch`` is a dict or a list, as ``arrays``. Returns what ``fn`` returns (an array or a
    tuple of arrays), each ``[N, ...]``."""
    named = isinstance(arrays, Mapping)
    items = list(arrays.items()) if named else list(enumerate(arrays))
    n = items[0][1].shape[0]
    outs = []
    for a in range(0, n, batch_size):
        m = min(a + batch_size, n) - a
        pad = batch_size - m
        chunk = [(k, np.pad(x[a:a + m], [(0, pad)] + [(0, 0)] * (x.ndim - 1))) for k, x in items]
        out = fn(*args, dict(chunk) if named else [x for _, x in chunk])
        single = not isinstance(out, tuple)
        outs.append(tuple(np.asarray(o)[:m] for o in ((out,) if single else out)))
    if not outs:
        return None
    cat = tuple(np.concatenate(parts) for parts in zip(*outs))
    return cat[0] if single else cat
