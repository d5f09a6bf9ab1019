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

__all__ = ["WeightingRule", "WEIGHTING_RULES", "uniform_weights", "wpo_weights", "normalize_weights", "weight_stats"]


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


def wpo_weights(train_features, *, val_features=None, aux=None, clip: float | None = 1.0, normalize: bool = False):
    """WPO (Zhou et al. 2024): ``w = exp(ā(y_w) + ā(y_l))``, the policy's own (alignment-
    adjusted) probability of the pair, detached.

    ``ā`` comes from :func:`alignshift.losses.logps.sequence_logps_wpo` via
    ``aux["policy_chosen_wpo"]``/``aux["policy_rejected_wpo"]``. ``clip`` caps ``w`` (the WPO
    repo clips at 1; ``None`` = no cap). The WPO repo and TRL do **not** normalise: the loss is
    ``mean_i w_i·ℓ_i`` with raw ``w ≤ 1`` (``normalize=False``, the default, for parity);
    ``normalize=True`` rescales to mean 1 as the other rules do.
    """
    del train_features, val_features
    if aux is None or "policy_chosen_wpo" not in aux:
        raise ValueError("wpo weights need aux['policy_chosen_wpo'] and aux['policy_rejected_wpo']")
    logw = jax.lax.stop_gradient(aux["policy_chosen_wpo"] + aux["policy_rejected_wpo"])
    w = jnp.exp(logw)
    if clip is not None:
        w = jnp.minimum(w, clip)
    if normalize:
        # in log space: robust when every exp(logw) underflows
        w = jnp.exp(logw - jax.nn.logsumexp(logw)) * logw.shape[0] if clip is None else normalize_weights(w)
    return w


class WeightingRule(NamedTuple):
    """A registered rule: the function, which per-example features it reads, whether it needs
    a deployment/validation batch, whether it needs WPO's per-sequence term, and whether the
    objective should rescale its output to mean 1 (False: the rule decides, e.g. WPO)."""

    fn: Callable[..., jax.Array]
    features: str  # "loss" | "rewards" | "none"
    needs_val: bool
    needs_wpo: bool = False
    normalize: bool = True


WEIGHTING_RULES: dict[str, WeightingRule] = {
    "uniform": WeightingRule(uniform_weights, features="none", needs_val=False),
    "wpo": WeightingRule(wpo_weights, features="none", needs_val=False, needs_wpo=True, normalize=False),
}
