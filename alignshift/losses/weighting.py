"""Batch weighting rules: how per-example losses are combined into one objective.

Contract (design.md): ``weights = rule(train_features, *, val_features=None, aux=None, **hp)``
returns ``w [B] >= 0`` with ``mean(w) == 1``, computed under ``stop_gradient``. The objective
is then ``mean_i w_i · ℓ_i`` (see :mod:`alignshift.losses.objective`).

This module starts with the uniform rule (plain ERM); kernel mean matching (IW-DPO), WPO,
KL-DRO and DoRA weights are added as further entries of :data:`WEIGHTING_RULES`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["WeightingRule", "WEIGHTING_RULES", "uniform_weights", "normalize_weights", "weight_stats"]


def normalize_weights(w: jax.Array) -> jax.Array:
    """Rescale non-negative weights to mean 1 (uniform if they sum to 0), detached."""
    w = jax.lax.stop_gradient(jnp.maximum(w, 0.0))
    total = w.sum()
    n = w.shape[0]
    return jnp.where(total > 0, w * (n / jnp.where(total > 0, total, 1.0)), jnp.ones_like(w))


def uniform_weights(train_features, *, val_features=None, aux=None) -> jax.Array:
    """Plain empirical risk: every example weighs 1."""
    del val_features, aux
    return jnp.ones((jnp.shape(train_features)[0],), jnp.float32)


def weight_stats(w: jax.Array) -> dict:
    """min / max / normalised effective sample size ``(Σw)² / (n·Σw²)`` ∈ (0, 1]."""
    n = w.shape[0]
    ess = jnp.square(w.sum()) / jnp.maximum(n * jnp.square(w).sum(), 1e-30)
    return {"weights/min": w.min(), "weights/max": w.max(), "weights/ess": ess}


class WeightingRule(NamedTuple):
    """A registered rule: the function, which per-example features it reads, and whether it
    needs a deployment/validation batch."""

    fn: Callable[..., jax.Array]
    features: str  # "loss" | "rewards" | "none"
    needs_val: bool


WEIGHTING_RULES: dict[str, WeightingRule] = {
    "uniform": WeightingRule(uniform_weights, features="none", needs_val=False),
}
