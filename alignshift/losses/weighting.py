"""Batch weighting rules: how per-example losses are combined into one objective.

Contract (design.md): ``weights = rule(train_features, *, val_features=None, aux=None, **hp)``
returns ``w [B] >= 0`` with ``mean(w) == 1``, computed under ``stop_gradient``. The objective
is then ``mean_i w_i · ℓ_i`` (see :mod:`alignshift.losses.objective`).

Rules whose weights are not mean-1 by design (WPO's raw probabilities, KLDPO's unnormalised
tilt as in the authors' code) are registered with ``normalize=False`` and normalise (or not)
themselves, behind a named flag. Log-mean-exp reductions (DR-DPO; DoRA) register a ``reduce``
function: the objective is then that scalar (with gradient) and the rule's weights — the
softmax weights of its gradient — are logged.

Rules that reduce over the batch take ``axis_name``: under ``pmap``/``shard_map`` they gather
the global batch's losses with collectives, so the weights equal the global computation;
under ``jit`` with global arrays they need nothing.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from alignshift.losses.kmm import kmm_weights

__all__ = [
    "WeightingRule",
    "WEIGHTING_RULES",
    "uniform_weights",
    "wpo_weights",
    "iw_weights",
    "kmm_weights",
    "kl_dro_weights",
    "dr_dpo_weights",
    "dr_dpo_objective",
    "normalize_weights",
    "weight_stats",
]


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


def _global(x: jax.Array, axis_name: str | None) -> jax.Array:
    """The global batch's values (all-gathered under a named axis) — for batch reductions."""
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _local(w_all: jax.Array, n_local: int, axis_name: str | None) -> jax.Array:
    if axis_name is None:
        return w_all
    return jax.lax.dynamic_slice_in_dim(w_all, jax.lax.axis_index(axis_name) * n_local, n_local)


def kl_dro_weights(
    train_features,
    *,
    val_features=None,
    aux=None,
    tau: float = 0.05,
    clamp: float | None = 10.0,
    normalize: bool = False,
    axis_name: str | None = None,
):
    """KLDPO's worst-case (Gibbs-tilt) weights from the detached per-example losses ``L``.

    * ``normalize=False`` (authors' code, ``src/kldpo.py``): ``u_i = min(exp((L_i − L̄)/τ), clamp)``
      with ``L̄`` the mean over the **global** batch; not normalised, so it also scales the
      step by ``mean(u) ≥ 1``. The exponent is capped at ``log(clamp)`` before ``exp`` (or at 80
      without a clamp), so nothing overflows.
    * ``normalize=True`` (the paper's normalised Gibbs weights): ``w = n·softmax(L/τ)``
      computed with a max-shift, optionally clamped.

    As ``τ → ∞`` both tend to 1 (plain DPO). Under ``shard_map``/``pmap`` pass ``axis_name``.
    """
    del val_features, aux
    L_local = jax.lax.stop_gradient(train_features)
    L = _global(L_local, axis_name)
    if normalize:
        w = L.shape[0] * jax.nn.softmax(L / tau)
        if clamp is not None:
            w = jnp.minimum(w, clamp)
    else:
        x = (L - L.mean()) / tau
        w = jnp.exp(jnp.minimum(x, jnp.log(clamp) if clamp is not None else 80.0))
    return _local(w, L_local.shape[0], axis_name)


def dr_dpo_objective(losses, *, beta_prime: float = 1.0, axis_name: str | None = None):
    """Dr.DPO (Wu et al. 2024): ``−β'·log mean_i exp(−L_i/β')`` (soft-min: it DOWN-weights
    high-loss pairs, the opposite of KLDPO). Stable ``logsumexp − log n`` form."""
    L = _global(losses, axis_name)
    return -beta_prime * (jax.nn.logsumexp(-L / beta_prime) - jnp.log(L.shape[0]))


def dr_dpo_weights(train_features, *, val_features=None, aux=None, beta_prime: float = 1.0,
                   axis_name: str | None = None):
    """The effective (gradient) weights of :func:`dr_dpo_objective`: ``n·softmax(−L/β')``."""
    del val_features, aux
    L_local = jax.lax.stop_gradient(train_features)
    L = _global(L_local, axis_name)
    return _local(L.shape[0] * jax.nn.softmax(-L / beta_prime), L_local.shape[0], axis_name)


def iw_weights(
    train_features,
    *,
    val_features=None,
    aux=None,
    gamma: float | str = 0.1,
    ridge: float = 0.1,
    upper_bound: float = 50.0,
    eps: float | None = None,
    iters: int = 500,
    solver: str = "fista",
    warmup_examples: int = 1024,
):
    """IW-DPO (Lodkaew et al., TMLR 2025): kernel-mean-matching weights that make the training
    batch's features match the deployment/validation batch's (algorithms.md §2.4).

    Registered twice: ``iw_dpo_l`` (features = detached per-example losses) and ``iw_dpo_r``
    (features = the label-ordered implicit-reward pair ``[r̂_w, r̂_l]``). The objective then
    normalises ``ŵ = n·w/Σw``. Open choices of the paper are flags with the spec's defaults:
    ``gamma`` (RBF, 0.1 [SEED]; ``"median"``/``"diw_quantile"``), ``ridge`` (λ = 0.1 read as
    ``K + λI`` [INFER]; ``solver="closed_form"`` is the other reading), ``upper_bound`` B = 50 and
    ``eps`` = (√n−1)/√n (DIW). During the first ``warmup_examples`` training examples (1024
    [SEED]; counted as ``aux["step"]·n``) the weights are uniform: at π = π_ref all features are
    equal and KMM is degenerate.
    """
    w = kmm_weights(train_features, val_features, gamma=gamma, ridge=ridge, upper_bound=upper_bound,
                    eps=eps, iters=iters, solver=solver)
    if warmup_examples and aux is not None and "step" in aux:
        seen = aux["step"] * jnp.shape(train_features)[0]
        w = jnp.where(seen < warmup_examples, jnp.ones_like(w), w)
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
    # a log-mean-exp style reduction ``reduce(losses, **hp) -> scalar`` (with gradient); when
    # set, ``fn`` gives its effective per-example weights, for logging only
    reduce: Callable[..., jax.Array] | None = None


WEIGHTING_RULES: dict[str, WeightingRule] = {
    "uniform": WeightingRule(uniform_weights, features="none", needs_val=False),
    "wpo": WeightingRule(wpo_weights, features="none", needs_val=False, needs_wpo=True, normalize=False),
    "iw_dpo_l": WeightingRule(iw_weights, features="loss", needs_val=True),
    "iw_dpo_r": WeightingRule(iw_weights, features="rewards", needs_val=True),
    "kl_dro": WeightingRule(kl_dro_weights, features="loss", needs_val=False, normalize=False),
    "dr_dpo": WeightingRule(dr_dpo_weights, features="loss", needs_val=False, normalize=False,
                            reduce=dr_dpo_objective),
}
