"""A data-parallel ``jax.pmap`` preference step, for users who think in pmap.

The mesh path (:mod:`alignshift.parallel.rules`, jit + ``NamedSharding``) is the main one;
this is the classic alternative: the train state is replicated on every local device, the
batch is split into equal per-device shards, each device runs the policy forward and the
objective on its shard, gradients are averaged with ``lax.pmean`` and every device applies the
same optimiser update. Every argument carries a leading device axis::

    from alignshift.parallel.pmap import (make_pmap_preference_step, replicate, shard_for_pmap,
                                          unreplicate)

    step = make_pmap_preference_step(graphdef, rest, tx, objective)
    state = replicate(init_state(params, tx))          # [n_dev, ...] on each leaf
    ref = replicate(ref_params)                        # only for an in-step reference
    for batch in batches:                              # host batches [B, ...]
        state, metrics = step(state, shard_for_pmap(batch), ref)   # [n_dev, B/n_dev, ...]
    metrics = unreplicate(metrics)                     # identical on every device
    params = unreplicate(state)["params"]

Global-batch semantics (the result equals :func:`alignshift.train.steps.make_preference_step`
on the whole batch):

* The loss is a mean over pairs, so with equal shards the global loss is the mean of the
  per-device means and its gradient the ``pmean`` of the per-device gradients.
* Batch reductions inside the objective use collectives over ``axis_name``: the objective is
  rebuilt (``dataclasses.replace``) with ``axis_name`` in ``base_kwargs`` for KTO (global
  ``z₀``) and in ``weighting_kwargs`` for rules whose function accepts it (``kl_dro``:
  global mean / softmax; ``dr_dpo``: global log-mean-exp). A quantity that is the same
  global value on every device (DR-DPO's reduction) gets, through the transpose of the
  collective (``all_gather``'s is a reduce-scatter), ``n_dev`` times each device's share of
  its gradient, so the ``pmean`` of the gradients is again the global gradient.
* Rules that reduce over the batch but take no ``axis_name`` (``iw_dpo_l``/``iw_dpo_r``:
  KMM over the batch and the objective's mean-1 normalisation; ``wpo``) are NOT run per
  device shard: each device all-gathers the objective's per-example inputs (``[B]`` vectors:
  log-probs, lengths, data weights — a few floats per pair) and the (sharded) validation
  batch's, and evaluates the unchanged objective on the global batch, so the KMM weights are
  the global ones. The gradient reaches each device's parameters through the
  ``all_gather`` transpose as above. The weights are recomputed on every device (cheap next
  to the model forward; KMM is O(B²) per iteration).
* WDPO's penalty: the per-pair terms ``P_i`` are independent (pair ``i``'s embedding gradient
  depends only on pair ``i``'s loss), so the global ``mean_i P_i`` is the ``pmean`` of the
  per-device means; ``penalty="sqrt_mean"`` takes the square root of that global mean.

Metrics are ``pmean``-ed over devices (every metric of the objective is a batch mean or a
global value), except ``weights/min``, ``weights/max`` and ``penalty/pair_max`` (``pmin`` /
``pmax``: the global extremes). ``weights/ess`` under the per-device path (``uniform``,
``kl_dro``, ``dr_dpo``) is the mean of the per-shard effective sample sizes — not the
global ESS (it equals it when the weights are uniform); under the gather path (``iw_*``,
``wpo``) it is the global one.

Shards must be equal (:func:`shard_for_pmap` raises otherwise); pad or drop rows first.
:func:`replicate` builds arrays over this process's devices (single-process use); pass it the
step's ``devices``/``axis_name`` if they are not the defaults, so the state it builds has the
sharding the step returns (otherwise the second call compiles the step again).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignshift.losses import Objective
from alignshift.losses.objective import BASE_LOSSES
from alignshift.losses.weighting import WEIGHTING_RULES
from alignshift.forward import attach_reference, make_logits_fn
from alignshift.train.steps import apply_gradients, step_inputs
from alignshift.train.penalty import add_penalty

__all__ = [
    "make_pmap_preference_step",
    "pmap_objective",
    "replicate",
    "unreplicate",
    "shard_for_pmap",
]

# metrics that are extremes over the batch, not means: reduced with pmin/pmax
_PMIN_METRICS = ("weights/min",)
_PMAX_METRICS = ("weights/max", "penalty/pair_max")


# --------------------------------------------------------------------------- host helpers


def _devices(devices: Sequence[jax.Device] | None) -> list:
    return list(devices) if devices is not None else jax.local_devices()


def _device_sharding(devs: list, axis_name: str) -> jax.sharding.NamedSharding:
    """The sharding ``jax.pmap`` gives its ``[n_dev, ...]`` outputs."""
    mesh = jax.sharding.Mesh(np.array(devs), (axis_name,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis_name))


def replicate(tree: Any, devices: Sequence[jax.Device] | None = None, *, axis_name: str = "batch") -> Any:
    """Every leaf ``x`` -> ``[n_dev, *x.shape]``, one copy on each device (pmap's layout for
    broadcast state). ``None`` stays ``None``. The arrays carry exactly the sharding the pmap
    step (same ``axis_name`` and devices) gives its outputs, so feeding the step its own
    output does not compile it a second time."""
    devs = _devices(devices)
    sharding = _device_sharding(devs, axis_name)

    def rep(x):
        x = jnp.asarray(x)
        shards = [jax.device_put(x[None], d) for d in devs]
        return jax.make_array_from_single_device_arrays((len(devs), *x.shape), sharding, shards)

    return jax.tree_util.tree_map(rep, tree)


def unreplicate(tree: Any) -> Any:
    """The first device's copy of every leaf (``x[0]``): the inverse of :func:`replicate`, and
    the way to read the step's metrics (identical on every device)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def shard_for_pmap(batch: dict | None, n_devices: int | None = None) -> dict | None:
    """Split every ``[B, ...]`` column into ``[n_devices, B / n_devices, ...]`` (device ``d``
    gets rows ``d·B/n .. (d+1)·B/n``). Raises a ``ValueError`` naming the column when ``B`` is
    not divisible by ``n_devices`` (default: the local device count). Works on NumPy (no
    copy) and JAX arrays; ``None`` passes through."""
    if batch is None:
        return None
    n = jax.local_device_count() if n_devices is None else int(n_devices)
    if n < 1:
        raise ValueError(f"shard_for_pmap: n_devices must be >= 1; got {n}")
    out = {}
    for k, x in batch.items():
        shape = np.shape(x)
        if len(shape) == 0:
            raise ValueError(f"shard_for_pmap: batch[{k!r}] is a scalar; every column needs a leading batch axis")
        b = shape[0]
        if b % n:
            raise ValueError(
                f"shard_for_pmap: batch[{k!r}] has {b} rows, not divisible by {n} devices "
                f"({b} % {n} = {b % n}); pad or drop rows so every device gets an equal shard"
            )
        out[k] = x.reshape((n, b // n, *shape[1:]))
    return out


# --------------------------------------------------------------------------- objective


def pmap_objective(objective: Objective, axis_name: str) -> tuple[Objective, bool]:
    """``(per_device_objective, gather)``.

    ``per_device_objective`` is ``objective`` with ``axis_name`` injected where the base loss
    (``kto``) or the weighting rule declares ``collectives`` (it reduces over the batch with
    collectives: ``kl_dro``, ``dr_dpo``, ``dora``, ``dro``), so its batch reductions are global
    when run on one device's shard inside ``pmap``. ``gather`` is True when the rule has no
    collectives and is not ``uniform`` (``iw_dpo_l``/``iw_dpo_r``, ``wpo``, ``dora_reweight``): the
    step then evaluates the objective on the all-gathered per-example inputs instead.
    """
    base_kwargs = dict(objective.base_kwargs)
    weighting_kwargs = dict(objective.weighting_kwargs)
    if BASE_LOSSES[objective.base].collectives:
        base_kwargs["axis_name"] = axis_name
    gather = False
    if WEIGHTING_RULES[objective.weighting].collectives:
        weighting_kwargs["axis_name"] = axis_name
    elif objective.weighting != "uniform":
        gather = True
    obj = dataclasses.replace(objective, base_kwargs=base_kwargs, weighting_kwargs=weighting_kwargs)
    return obj, gather


def _all_gather_inputs(inputs: dict | None, axis_name: str) -> dict | None:
    """Per-example ``[b]`` entries -> the global ``[B]`` (tiled all_gather, differentiable);
    scalars (``step``) are kept."""
    if inputs is None:
        return None
    return {
        k: jax.lax.all_gather(v, axis_name, tiled=True) if jnp.ndim(v) >= 1 else v for k, v in inputs.items()
    }


def _global_penalty(objective: Objective, penalty, pair_pen, axis_name):
    """The penalty over the global batch from each device's per-pair terms."""
    kind = objective.penalty_kwargs.get("penalty", "squared_mean")
    if kind == "squared_mean":  # rho * mean_i P_i: the mean of per-device means
        return jax.lax.pmean(penalty, axis_name)
    from alignshift.losses.penalties import PENALTIES

    rho = objective.penalty_kwargs.get("rho", inspect.signature(PENALTIES[objective.penalty]).parameters["rho"].default)
    m = jax.lax.pmean(pair_pen.mean(), axis_name)
    return rho * jnp.sqrt(jnp.maximum(m, 1e-20))  # as wdpo_penalty's sqrt_mean, on the global mean


def _reduce_metrics(metrics: dict, axis_name: str) -> dict:
    out = {}
    for k, v in metrics.items():
        if k in _PMIN_METRICS:
            out[k] = jax.lax.pmin(v, axis_name)
        elif k in _PMAX_METRICS:
            out[k] = jax.lax.pmax(v, axis_name)
        else:
            out[k] = jax.lax.pmean(v, axis_name)
    return out


# --------------------------------------------------------------------------- step


def make_pmap_preference_step(
    graphdef,
    rest,
    tx: optax.GradientTransformation,
    objective: Objective,
    *,
    axis_name: str = "batch",
    devices: Sequence[jax.Device] | None = None,
) -> Callable:
    """``step(state, batch, ref_params=None, val_batch=None) -> (state, metrics)`` under
    ``jax.pmap`` over ``devices`` (default: all local devices).

    Layout: ``state`` (and ``ref_params``, when the reference runs in the step) replicated
    with :func:`replicate`; ``batch`` (and ``val_batch``) split with :func:`shard_for_pmap`
    into ``[n_dev, B/n_dev, ...]``. Returns the replicated new state (``state`` is donated)
    and metrics ``[n_dev]`` (identical on every device; read them with :func:`unreplicate`).

    Equals :func:`alignshift.train.steps.make_preference_step` on the unsplit batch: see the
    module docstring for how each batch reduction is made global (collectives over
    ``axis_name`` for KTO's ``z₀``, ``kl_dro``, ``dr_dpo``; all-gathered per-example inputs
    for ``iw_dpo_l``/``iw_dpo_r`` and ``wpo``; ``pmean`` for WDPO's penalty) and which metrics
    are not exactly global (``weights/ess`` on the per-device path). WDPO's penalty gradient is
    the exact (double-backprop) one here; its first-order modes
    (:class:`~alignshift.losses.penalties.PenaltyGradient`) are a setting of the jit step.
    """
    if objective.penalty is not None and objective.penalty != "wdpo":
        raise NotImplementedError(f"penalty {objective.penalty!r} has no pmap reduction")
    devs = _devices(devices)
    n_dev = len(devs)
    obj, gather = pmap_objective(objective, axis_name)
    logits_fn = make_logits_fn(graphdef, rest)

    def loss_fn(params, batch, val_batch, step):
        inputs, val_inputs, penalty, pair_pen = step_inputs(graphdef, rest, params, batch, obj, val_batch, step)
        if penalty is not None:
            penalty = _global_penalty(obj, penalty, pair_pen, axis_name)
        if gather:  # the unchanged objective on the global batch's per-example inputs
            loss, metrics = objective(_all_gather_inputs(inputs, axis_name), _all_gather_inputs(val_inputs, axis_name))
        else:
            loss, metrics = obj(inputs, val_inputs)
        return add_penalty(loss, metrics, penalty, pair_pen)

    def _step(state, batch, ref_params, val_batch):
        # the frozen reference runs outside value_and_grad, on this device's shard
        batch = attach_reference(logits_fn, batch, objective, ref_params)
        val_batch = attach_reference(logits_fn, val_batch, objective, ref_params)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"], batch, val_batch, state["step"]
        )
        grads = jax.lax.pmean(grads, axis_name)
        metrics = _reduce_metrics(metrics, axis_name)
        metrics["grad_norm"] = optax.tree.norm(grads)
        return apply_gradients(state, grads, tx), metrics

    pstep = jax.pmap(_step, axis_name=axis_name, devices=devs, donate_argnums=(0,))

    def _check_leading(name, tree, per_device_hint):
        for path, x in jax.tree_util.tree_leaves_with_path(tree):
            shape = np.shape(x)
            if not shape or shape[0] != n_dev:
                key = jax.tree_util.keystr(path)
                raise ValueError(
                    f"pmap step: {name}{key} has shape {tuple(shape)}; its leading axis must be the "
                    f"{n_dev} devices ({per_device_hint})"
                )

    def step(state, batch, ref_params=None, val_batch=None):
        _check_leading("batch", batch, "split it with shard_for_pmap(batch)")
        if val_batch is not None:
            _check_leading("val_batch", val_batch, "split it with shard_for_pmap(val_batch)")
        _check_leading("state", state, "replicate it with replicate(state)")
        if ref_params is not None:
            _check_leading("ref_params", ref_params, "replicate it with replicate(ref_params)")
        return pstep(state, batch, ref_params, val_batch)

    step.pmapped = pstep
    step.n_devices = n_dev
    step.objective = obj
    step.gathers_inputs = gather
    return step
