"""The weighting-rule interface: a rule reduces per-example losses to ONE scalar objective.

A rule is a function

    rule(losses [B], features, *, val_features=None, aux=None, data_weight=None, **hp) -> scalar

* ``losses`` — the base loss per example (differentiable);
* ``features`` — the detached per-example features the rule reads (the losses, or the
  implicit-reward pair ``[B, 2]``; see :class:`WeightingRule.features`);
* ``val_features`` — the same features of a deployment/validation batch (IW rules);
* ``aux`` — the batch's inputs (WPO's log-weight terms, DoRA's classifier outputs, ``step``);
* ``data_weight`` — optional per-example data weights ``[B]`` (``inputs["weight"]``), detached;
* ``hp`` — the rule's hyper-parameters (``axis_name`` too, for rules with collectives).

Linear rules are ``mean_i (w_i·d_i)·ℓ_i`` with detached weights ``w`` (:func:`linear_rule`);
log-mean-exp rules are their reduction. Either way the objective's gradient is
``mean_i w_i·∇ℓ_i`` for some effective weights ``w``, and :func:`reduce_losses` returns them
(``n·∂objective/∂ℓ``) alongside the objective, for logging; no rule restates its weights
separately.

Rules that reduce over the batch take ``axis_name``: under ``pmap``/``shard_map`` they gather the
global batch with collectives (:func:`gather_batch`), so the objective equals the global
computation; under ``jit`` with global arrays they need nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp

from alignshift.losses.hparams import HParam

__all__ = [
    "WeightingRule",
    "reduce_losses",
    "linear_rule",
    "normalize_weights",
    "log_mean_exp",
    "weight_stats",
    "gather_batch",
    "local_rows",
]


def normalize_weights(w: jax.Array) -> jax.Array:
    """Rescale non-negative weights to mean 1 (uniform if they sum to 0), detached."""
    w = jax.lax.stop_gradient(jnp.maximum(w, 0.0))
    total = w.sum()
    n = w.shape[0]
    return jnp.where(total > 0, w * (n / jnp.where(total > 0, total, 1.0)), jnp.ones_like(w))


def weight_stats(w: jax.Array) -> dict:
    """min / max / normalised effective sample size ``(Σw)² / (n·Σw²)`` ∈ (0, 1]."""
    n = w.shape[0]
    ess = jnp.square(w.sum()) / jnp.maximum(n * jnp.square(w).sum(), 1e-30)
    return {"weights/min": w.min(), "weights/max": w.max(), "weights/ess": ess}


def gather_batch(x: jax.Array, axis_name: str | None) -> jax.Array:
    """The global batch's values (all-gathered under a named axis) — for batch reductions."""
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def local_rows(x_all: jax.Array, n_local: int, axis_name: str | None) -> jax.Array:
    """This device's ``n_local`` rows of a global-batch vector (inverse of :func:`gather_batch`)."""
    if axis_name is None:
        return x_all
    return jax.lax.dynamic_slice_in_dim(x_all, jax.lax.axis_index(axis_name) * n_local, n_local)


def log_mean_exp(a: jax.Array, lam: float = 1.0) -> jax.Array:
    """``λ·log mean_i exp(a_i/λ)`` of a vector, accurate for every ``λ > 0``.

    Computed as ``ā + λ·log mean exp((a − ā)/λ)`` (an exact identity). When the centred
    exponents are small the inner term is ``λ·log1p(mean(expm1(x)))``, which keeps its relative
    precision as ``λ → ∞`` (the naive ``λ·(logsumexp(a/λ) − log n)`` loses all digits of the
    mean to cancellation in float32 for ``λ ≳ 10⁴``); otherwise the max-shifted
    ``logsumexp − log n``. The gradient is ``softmax(a/λ)`` either way.
    """
    a = jnp.asarray(a)
    n = a.shape[0]
    c = jnp.mean(a)
    x = (a - c) / lam
    small = lam * jnp.log1p(jnp.mean(jnp.expm1(jnp.minimum(x, 30.0))))
    big = lam * (jax.nn.logsumexp(x) - jnp.log(n))
    return c + jnp.where(jnp.max(x) < 30.0, small, big)


class _LinearRule:
    """``mean_i (w_i·d_i)·ℓ_i`` of a weights function (see :func:`linear_rule`)."""

    def __init__(self, weights_fn: Callable[..., jax.Array], normalize: bool):
        self.weights_fn, self.normalize = weights_fn, normalize
        functools.update_wrapper(self, weights_fn)

    def weights(self, features, *, val_features=None, aux=None, data_weight=None, **hp) -> jax.Array:
        """The effective (detached) weights ``w_i·d_i``."""
        w = self.weights_fn(features, val_features=val_features, aux=aux, **hp)
        w = normalize_weights(w) if self.normalize else jax.lax.stop_gradient(w)
        return w if data_weight is None else w * data_weight  # data weights, combined multiplicatively

    def __call__(self, losses, features, *, val_features=None, aux=None, data_weight=None, **hp):
        w = self.weights(features, val_features=val_features, aux=aux, data_weight=data_weight, **hp)
        return jnp.mean(w * losses)


def linear_rule(weights: Callable[..., jax.Array], *, normalize: bool) -> Callable[..., jax.Array]:
    """The rule ``mean_i (w_i·d_i)·ℓ_i`` of a weights function
    ``weights(features, *, val_features=None, aux=None, **hp) -> w [B]`` (the design's weight
    contract), with ``w`` detached. ``normalize=True`` rescales ``w`` to mean 1 (the rule's own
    weights are then relative, e.g. KMM's); ``False`` keeps them as the rule returns them (WPO's
    raw probabilities, KLDPO's unnormalised tilt: those rules normalise behind their own flag)."""
    return _LinearRule(weights, normalize)


def reduce_losses(rule: "WeightingRule", losses: jax.Array, *, features=None, val_features=None, aux=None,
                  data_weight=None, **hp) -> tuple[jax.Array, jax.Array]:
    """``(objective, weights)``: the rule's scalar objective of ``losses`` (differentiable, exactly
    ``rule.objective(...)``) and its effective per-example weights ``w = n·∂objective/∂ℓ``
    (detached; the objective's gradient is ``mean_i w_i·∇ℓ_i``). A linear rule's weights are its
    own ``w_i·d_i`` (computed once); any other rule's come from differentiating the rule on the
    detached losses (a ``[B]``-vector gradient), so no rule restates its weights.

    ``features`` defaults to the detached losses. Under a named axis (``axis_name`` in ``hp``)
    the objective is global and ``w`` are this device's rows of the global weights (the
    all-gather's transpose sums every device's identical cotangent, which supplies the
    factor ``n_global/n_local``)."""
    if features is None:
        features = jax.lax.stop_gradient(losses)
    kw = dict(val_features=val_features, aux=aux, data_weight=data_weight, **hp)
    if isinstance(rule.objective, _LinearRule):
        w = rule.objective.weights(features, **kw)
        return jnp.mean(w * losses), w
    value = rule.objective(losses, features, **kw)
    grad = jax.grad(lambda ell: rule.objective(ell, features, **kw))(jax.lax.stop_gradient(losses))
    return value, jax.lax.stop_gradient(grad * losses.shape[0])  # n·∂objective/∂ℓ


@dataclasses.dataclass(frozen=True)
class WeightingRule:
    """A registered weighting rule.

    * ``objective`` — the rule (see the module docstring): losses and features in, ONE scalar out;
    * ``features`` — what ``features`` holds: ``"loss"`` (the detached losses), ``"rewards"``
      (the label-ordered implicit-reward pair ``[B, 2]``) or ``"none"`` (only read for the batch
      size; the detached losses are passed);
    * ``hparams`` — its hyper-parameters (:class:`alignshift.losses.hparams.HParam`);
    * ``requires`` — the inputs it needs beyond the base loss's (kinds of
      :data:`alignshift.losses.objective.REQUIREMENTS`: ``"val_batch"``, ``"wpo_terms"``,
      ``"source"``);
    * ``collectives`` — it reduces over the batch and takes ``axis_name`` (collectives under
      ``pmap``/``shard_map``);
    * ``per_example`` — the objective is ``mean_i c_i·ℓ_i`` with each ``c_i`` a function of example
      ``i`` alone (a bool, or a function of the rule's hyper-parameters, e.g. WPO unless it
      normalises over the batch): gradient accumulation may then reduce each micro-batch on its
      own (one pass) instead of weighting the whole batch first (:mod:`alignshift.train.accumulate`).
      False (the safe default) for every rule that couples the batch's examples.
    """

    objective: Callable[..., jax.Array]
    features: str = "none"  # "loss" | "rewards" | "none"
    hparams: tuple[HParam, ...] = ()
    requires: frozenset[str] = frozenset()
    collectives: bool = False
    per_example: bool | Callable[[dict], bool] = False

    def is_per_example(self, hp: dict) -> bool:
        """``per_example`` for the hyper-parameters ``hp`` (see the class docstring)."""
        return bool(self.per_example(hp) if callable(self.per_example) else self.per_example)



