"""Batch weighting rules: how per-example losses are combined into ONE objective.

A rule takes the per-example losses and features (plus validation features and the batch's
inputs where it needs them) and returns the scalar objective; its effective per-example
weights, logged as ``weights/*``, are derived from it (``n·∂objective/∂ℓ``); the interface is
:mod:`alignshift.losses.reduction` (:func:`~alignshift.losses.reduction.reduce_losses`). The
weights functions here, ``w = weights(train_features, *, val_features=None, aux=None, **hp)``
(the design's weight contract), are the building blocks of the linear rules
``mean_i (w_i·d_i)·ℓ_i`` (``w`` detached, ``d`` the optional data weights ``inputs["weight"]``).

=================  ====================================  ================================================
registry key       rule function                         objective
=================  ====================================  ================================================
``uniform``        :func:`uniform_rule`                  ``mean(ℓ)`` (plain ERM)
``wpo``            :func:`wpo_rule`                      ``mean(w·ℓ)``, ``w = exp(ā(y_w) + ā(y_l))`` (WPO)
``iw_dpo_l``       :func:`iw_rule` on the losses         ``mean(ŵ·ℓ)``, ``ŵ`` KMM weights, mean 1 (IW-DPO)
``iw_dpo_r``       :func:`iw_rule` on implicit rewards   as ``iw_dpo_l``
``kl_dro``         :func:`kldpo_tilt_rule`               ``mean(w·ℓ)``, ``w`` KLDPO's worst-case tilt
``dr_dpo``         :func:`drdpo_softmin_rule`            ``−β'·log mean exp(−ℓ/β')`` (Dr.DPO)
``dora``           :func:`.dora.dora_rule`               ``λ·log mean exp(H·ℓ/λ)`` (DoRA)
``dro``            :func:`.dora.dora_dro_only_rule`      ``λ·log mean exp(ℓ/λ)`` (DoRA's "DRO only")
``dora_reweight``  :func:`.dora.dora_reweight_only_rule`  ``mean(H·ℓ)`` (DoRA's "reweighting only")
=================  ====================================  ================================================

Three rules are easy to confuse. They come from different papers and weight by the loss in
OPPOSITE directions:

==========  ==========================================================  ============================
key         paper and form                                              direction
==========  ==========================================================  ============================
``kl_dro``  KLDPO (Xu et al., NeurIPS 2025; ``src/kldpo.py``): the      UP-weights high-loss pairs
            worst-case KL tilt ``w ∝ exp(ℓ/τ)`` of the detached
            losses, linear (clamped, unnormalised: authors' code)
``dr_dpo``  Dr.DPO (Wu et al. 2024): the soft-min                       DOWN-weights high-loss pairs
            ``−β'·log mean exp(−ℓ/β')``                                 (robust to noisy labels)
``dro``     DoRA (Zhu et al., NeurIPS 2025), its "DRO only" ablation:   UP-weights high-loss pairs
            KL-DRO at a fixed dual variable, ``λ·log mean exp(ℓ/λ)``,
            no calibration
==========  ==========================================================  ============================

(``kl_dro`` with ``normalize=True, clamp=None`` has, mathematically, the gradient of ``dro`` at
``λ = τ``.) Rules whose weights are not mean-1 by design (WPO's raw probabilities, KLDPO's
unnormalised tilt as in the authors' code) normalise (or not) behind a named flag.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignshift.losses.dora import DORA_RULES
from alignshift.losses.hparams import NONNEGATIVE, POSITIVE, HParam
from alignshift.losses.kmm import kmm_weights
from alignshift.losses.reduction import (
    WeightingRule,
    gather_batch,
    linear_rule,
    local_rows,
    normalize_weights,
    weight_stats,
)

__all__ = [
    "WeightingRule",
    "WEIGHTING_RULES",
    "uniform_weights",
    "uniform_rule",
    "wpo_weights",
    "wpo_rule",
    "iw_weights",
    "iw_rule",
    "kmm_weights",
    "kldpo_tilt_weights",
    "kldpo_tilt_rule",
    "drdpo_softmin_rule",
    "normalize_weights",
    "weight_stats",
]


def uniform_weights(train_features, *, val_features=None, aux=None) -> jax.Array:
    """Plain empirical risk: every example weighs 1."""
    del val_features, aux
    return jnp.ones((jnp.shape(train_features)[0],), jnp.float32)


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


def kldpo_tilt_weights(
    train_features,
    *,
    val_features=None,
    aux=None,
    tau: float = 0.05,
    clamp: float | None = 10.0,
    normalize: bool = False,
    axis_name: str | None = None,
):
    """KLDPO's worst-case (Gibbs-tilt) weights from the detached per-example losses ``L``:
    they UP-weight high-loss pairs.

    * ``normalize=False`` (authors' code, ``src/kldpo.py``): ``u_i = min(exp((L_i − L̄)/τ), clamp)``
      with ``L̄`` the mean over the **global** batch; not normalised, so it also scales the
      step by ``mean(u) ≥ 1``. The exponent is capped at ``log(clamp)`` before ``exp`` (or at 80
      without a clamp), so nothing overflows.
    * ``normalize=True`` (the paper's normalised Gibbs weights): ``w = n·softmax(L/τ)``
      computed with a max-shift, optionally clamped.

    **Step-size confound.** Without the clamp, ``u = c·n·softmax(L/τ)`` with
    ``c = mean_j exp((L_j − L̄)/τ) ≥ 1`` (Jensen): the authors' gradient is the normalised
    tilt's gradient times ``c``, an implicit learning-rate multiplier that grows as τ shrinks
    or the losses spread (with the clamp, each weight is capped at ``clamp``, so ``c ≤ clamp``:
    up to 10× at the authors' setting). Against DPO at the same learning rate, the authors'
    form therefore changes two things at once — which pairs carry the weight, and how big the
    step is. ``normalize=True`` (mean-1 weights) isolates the first; compare both forms (the
    configs list ``normalize: true`` rows next to the authors' form) or tune the learning rate
    per method (``tuning:``) before reading a KLDPO gain as robustness
    (docs/results/recipes.md).

    As ``τ → ∞`` both tend to 1 (plain DPO). Under ``shard_map``/``pmap`` pass ``axis_name``.
    """
    del val_features, aux
    L_local = jax.lax.stop_gradient(train_features)
    L = gather_batch(L_local, axis_name)
    if normalize:
        w = L.shape[0] * jax.nn.softmax(L / tau)
        if clamp is not None:
            w = jnp.minimum(w, clamp)
    else:
        x = (L - L.mean()) / tau
        w = jnp.exp(jnp.minimum(x, jnp.log(clamp) if clamp is not None else 80.0))
    return local_rows(w, L_local.shape[0], axis_name)


def drdpo_softmin_rule(losses, features=None, *, val_features=None, aux=None, data_weight=None,
                       beta_prime: float = 1.0, axis_name: str | None = None):
    """Dr.DPO (Wu et al. 2024): ``−β'·log mean_i exp(−L_i/β')`` with ``L = d·ℓ`` (data-weighted).

    A soft-min: it DOWN-weights high-loss pairs (effective weights ``n·softmax(−L/β')``), the
    opposite of KLDPO's tilt. Stable ``logsumexp − log n`` form; over the global batch under
    ``axis_name``."""
    del features, val_features, aux
    losses = losses if data_weight is None else data_weight * losses
    L = gather_batch(losses, axis_name)
    return -beta_prime * (jax.nn.logsumexp(-L / beta_prime) - jnp.log(L.shape[0]))


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
    tol: float = 1e-6,
):
    """IW-DPO (Lodkaew et al., TMLR 2025): kernel-mean-matching weights that make the training
    batch's features match the deployment/validation batch's (docs/methods.md §2.4).

    Registered twice: ``iw_dpo_l`` (features = detached per-example losses) and ``iw_dpo_r``
    (features = the label-ordered implicit-reward pair ``[r̂_w, r̂_l]``). The rule then
    normalises ``ŵ = n·w/Σw``. Open choices of the paper are flags with the spec's defaults:
    ``gamma`` (RBF, 0.1 [SEED]; ``"median"``/``"diw_quantile"``), ``ridge`` (λ = 0.1 read as
    ``K + λI`` [INFER]; ``solver="closed_form"`` is the other reading), ``upper_bound`` B = 50 and
    ``eps`` = (√n−1)/√n (DIW); FISTA runs at most ``iters`` iterations and stops once converged to
    ``tol`` (:func:`kmm_weights`). During the first ``warmup_examples`` training examples (1024
    [SEED]; counted as ``aux["step"]·n``) the weights are uniform: at π = π_ref all features are
    equal and KMM is degenerate.
    """
    w = kmm_weights(train_features, val_features, gamma=gamma, ridge=ridge, upper_bound=upper_bound,
                    eps=eps, iters=iters, solver=solver, tol=tol)
    if warmup_examples and aux is not None and "step" in aux:
        seen = aux["step"] * jnp.shape(train_features)[0]
        w = jnp.where(seen < warmup_examples, jnp.ones_like(w), w)
    return w


# the linear rules: mean_i (w_i·d_i)·ℓ_i with detached weights (normalised to mean 1 or not)
uniform_rule = linear_rule(uniform_weights, normalize=True)
wpo_rule = linear_rule(wpo_weights, normalize=False)
iw_rule = linear_rule(iw_weights, normalize=True)
kldpo_tilt_rule = linear_rule(kldpo_tilt_weights, normalize=False)

_IW_HPARAMS = (
    HParam("gamma", 0.1, ("float", "str")),
    HParam("ridge", 0.1, ("float",), NONNEGATIVE),
    HParam("upper_bound", 50.0, ("float",), NONNEGATIVE),
    HParam("eps", None, ("None", "float")),
    HParam("iters", 500, ("int",)),
    HParam("solver", "fista", ("str",)),
    HParam("warmup_examples", 1024, ("int",), NONNEGATIVE),
    HParam("tol", 1e-6, ("float",)),
)

WEIGHTING_RULES: dict[str, WeightingRule] = {
    "uniform": WeightingRule(uniform_rule, per_example=True),
    "wpo": WeightingRule(wpo_rule, requires=frozenset({"wpo_terms"}), per_example=lambda hp: not hp.get("normalize", False),
                         hparams=(
        HParam("clip", 1.0, ("None", "float"), NONNEGATIVE),
        HParam("normalize", False, ("bool",)),
    )),
    "iw_dpo_l": WeightingRule(iw_rule, features="loss", requires=frozenset({"val_batch"}), hparams=_IW_HPARAMS),
    "iw_dpo_r": WeightingRule(iw_rule, features="rewards", requires=frozenset({"val_batch"}), hparams=_IW_HPARAMS),
    "kl_dro": WeightingRule(kldpo_tilt_rule, features="loss", collectives=True, hparams=(
        HParam("tau", 0.05, ("float",), POSITIVE),
        HParam("clamp", 10.0, ("None", "float"), NONNEGATIVE),
        HParam("normalize", False, ("bool",)),
    )),
    "dr_dpo": WeightingRule(drdpo_softmin_rule, features="loss", collectives=True, hparams=(
        HParam("beta_prime", 1.0, ("float",), POSITIVE),
    )),
    # DoRA (docs/methods.md §4) and its two ablations: "dora", "dro" ("DRO only"), "dora_reweight"
    **DORA_RULES,
}
