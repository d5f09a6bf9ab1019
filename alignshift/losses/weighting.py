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
    "log_mean_exp",
    "dora_calibration",
    "dora_pair_weights",
    "dora_objective",
    "dora_weights",
    "dora_reduce",
    "dro_weights",
    "dro_reduce",
    "dora_reweight_weights",
    "DORA_FORMS",
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
    tol: float = 1e-6,
):
    """IW-DPO (Lodkaew et al., TMLR 2025): kernel-mean-matching weights that make the training
    batch's features match the deployment/validation batch's (algorithms.md §2.4).

    Registered twice: ``iw_dpo_l`` (features = detached per-example losses) and ``iw_dpo_r``
    (features = the label-ordered implicit-reward pair ``[r̂_w, r̂_l]``). The objective then
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


# ----------------------------------------------------------------------------------- DoRA
DORA_FORMS = ("spec", "lire_code", "rrhf_code")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


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


def dora_calibration(p, *, alpha, source_share, eps: float = 1e-6):
    """DoRA's calibration weight per response (algorithms.md §4.2):

        h̃ = 1 / (α + a·(1 − p)/p)  =  p / (α·p + a·(1 − p))

    * ``p`` — the classifier's probability that the response comes from the TARGET
      distribution (precomputed, a constant);
    * ``alpha`` — the target share α of the training mixture, in (0, 1];
    * ``source_share`` — ``a``, the mixture share of the response's source (per response,
      broadcastable to ``p``): the authors' code passes each candidate slot's coefficient;
      with a single pooled target-vs-all-sources classifier ``a = 1 − α`` makes ``h̃`` the
      exact density ratio ``dQ₀/dP`` for a class-balanced classifier.

    ``h̃`` lies in ``[0, 1/α]`` (``p → 1`` gives ``1/α``, ``p → 0`` gives 0): α is the paper's
    stabiliser. ``p`` is clipped to ``[eps, 1]``. Returns float32 (or the input's float dtype),
    detached.
    """
    if _is_concrete(alpha):
        if not 0.0 < float(alpha) <= 1.0:
            raise ValueError(f"dora_calibration: alpha (target share) must be in (0, 1]; got {alpha}")
    p = jnp.asarray(p)
    p = p.astype(p.dtype if jnp.issubdtype(p.dtype, jnp.floating) else jnp.float32)
    a = jnp.asarray(source_share, p.dtype)
    if _is_concrete(p) and _is_concrete(a):
        if p.size and (jnp.any(~jnp.isfinite(p)) or jnp.any(p < 0) or jnp.any(p > 1)):
            raise ValueError("dora_calibration: p (classifier probability of 'target') must be in [0, 1]")
        if a.size and (jnp.any(~jnp.isfinite(a)) or jnp.any(a < 0)):
            raise ValueError("dora_calibration: source_share must be finite and >= 0")
    p = jax.lax.stop_gradient(jnp.clip(p, eps, 1.0))
    a = jax.lax.stop_gradient(a)
    return p / (alpha * p + a * (1.0 - p))


def dora_pair_weights(aux: dict, *, alpha: float) -> jax.Array:
    """Per-example (per pair / per prompt) weight ``H_j = mean_k h̃_{j,k}`` over the example's
    responses (the authors' code for DPO, BT and PL), from ``aux["source_prob"]`` and
    ``aux["source_share"]`` (``[B, K]``; K = 2 for pairs: chosen, rejected; or ``[B]``)."""
    if aux is None or "source_prob" not in aux or "source_share" not in aux:
        have = sorted(aux) if aux is not None else []
        raise ValueError("DoRA needs the per-response classifier outputs 'source_prob' and 'source_share' "
                         f"in the batch (see alignshift.rewards.source_classifier); the inputs hold {have}")
    h = dora_calibration(aux["source_prob"], alpha=alpha, source_share=aux["source_share"])
    return h.mean(-1) if h.ndim == 2 else h


def dora_objective(losses, h, *, lam: float = 1.0, axis_name: str | None = None):
    """The DoRA objective ``λ·log mean_i exp(h_i·ℓ_i/λ)`` (a scalar, differentiable in ``losses``).

    Its gradient is ``Σ_i softmax(h·ℓ/λ)_i · h_i · ∇ℓ_i``: small λ puts the weight on the
    worst calibrated losses, ``λ → ∞`` gives the calibrated mean ``mean(h·ℓ)``, one example
    gives ``h·ℓ``. ``h`` is a constant (``stop_gradient``). The reduction runs over the axis the
    losses are given on: under ``jit`` with a global batch, the global batch; called per
    micro-batch, the micro-batch (the authors' script runs it on micro-batches of ONE prompt,
    where it degenerates to pure reweighting). Under ``shard_map``/``pmap`` pass ``axis_name``
    to reduce over the global batch.
    """
    if _is_concrete(lam) and not float(lam) > 0:
        raise ValueError(f"dora_objective: lam must be > 0; got {lam}")
    losses = jnp.asarray(losses)
    h = jax.lax.stop_gradient(jnp.broadcast_to(jnp.asarray(h, losses.dtype), losses.shape))
    return log_mean_exp(_global(h * losses, axis_name), lam)


def _dora_loss(losses, aux, *, lam, alpha, calibrate, form, axis_name):
    if form not in DORA_FORMS:
        raise ValueError(f"unknown DoRA form {form!r}; choose one of {DORA_FORMS}")
    if not calibrate:
        return log_mean_exp(_global(losses, axis_name), lam)
    if form == "spec":
        return dora_objective(losses, dora_pair_weights(aux, alpha=alpha), lam=lam, axis_name=axis_name)
    h = dora_calibration(aux["source_prob"], alpha=alpha, source_share=aux["source_share"])
    L = _global(losses, axis_name)
    h = _global(h, axis_name)
    if form == "lire_code":  # λ·mean(h̃)·log mean_j exp(L_j/λ): calibration outside the log-mean-exp
        return jnp.mean(h) * log_mean_exp(L, lam)
    # rrhf_code: λ·log mean_{j,k} exp(h̃_{j,k}·L̄/λ), the weights multiply the batch-mean loss
    return log_mean_exp(jnp.ravel(h) * jnp.mean(L), lam)


def dora_reduce(losses, *, aux=None, lam: float = 1.0, alpha: float = 0.25, form: str = "spec",
                axis_name: str | None = None):
    """The ``dora`` rule's reduction. ``form="spec"`` (default): ``λ·log mean_j exp(H_j·ℓ_j/λ)``
    with ``H_j = mean_k h̃_{j,k}`` (the model of §4.1; the authors' DPO/PL code). The authors'
    other reductions, for parity: ``"lire_code"`` = ``λ·mean(h̃)·log mean_j exp(ℓ_j/λ)``,
    ``"rrhf_code"`` = ``λ·log mean_{j,k} exp(h̃_{j,k}·mean_j ℓ_j/λ)`` (§4.2)."""
    return _dora_loss(losses, aux, lam=lam, alpha=alpha, calibrate=True, form=form, axis_name=axis_name)


def dora_weights(train_features, *, val_features=None, aux=None, lam: float = 1.0, alpha: float = 0.25,
                 form: str = "spec", axis_name: str | None = None):
    """Effective per-example gradient weights of :func:`dora_reduce` (``form="spec"``), for
    logging: ``n·softmax(H·ℓ/λ)·H`` (the objective's gradient is ``mean_i w_i ∇ℓ_i``)."""
    del val_features, form
    L_local = jax.lax.stop_gradient(train_features)
    H_local = dora_pair_weights(aux, alpha=alpha)
    L, H = _global(L_local, axis_name), _global(H_local, axis_name)
    w = L.shape[0] * jax.nn.softmax(H * L / lam) * H
    return _local(w, L_local.shape[0], axis_name)


def dro_reduce(losses, *, aux=None, lam: float = 1.0, axis_name: str | None = None):
    """Vanilla KL-DRO at a fixed dual variable (DoRA's "DRO only" ablation):
    ``λ·log mean_i exp(ℓ_i/λ)``, no calibration. Up-weights HIGH-loss examples (the opposite
    of DR-DPO's soft-min)."""
    del aux
    return _dora_loss(losses, None, lam=lam, alpha=1.0, calibrate=False, form="spec", axis_name=axis_name)


def dro_weights(train_features, *, val_features=None, aux=None, lam: float = 1.0, axis_name: str | None = None):
    """Gradient weights of :func:`dro_reduce`: ``n·softmax(ℓ/λ)``."""
    del val_features, aux
    L_local = jax.lax.stop_gradient(train_features)
    L = _global(L_local, axis_name)
    return _local(L.shape[0] * jax.nn.softmax(L / lam), L_local.shape[0], axis_name)


def dora_reweight_weights(train_features, *, val_features=None, aux=None, alpha: float = 0.25,
                          normalize: bool = False):
    """DoRA's "reweighting only" ablation: the objective is ``mean_j H_j·ℓ_j`` with the raw
    calibration weights (``normalize=False``, as the ablation writes it); ``normalize=True``
    rescales them to mean 1 per batch."""
    del train_features, val_features
    w = jax.lax.stop_gradient(dora_pair_weights(aux, alpha=alpha))
    return normalize_weights(w) if normalize else w


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
    # the reduction also reads the batch's inputs: ``reduce(losses, aux=inputs, **hp)`` (DoRA)
    reduce_needs_aux: bool = False
    # reads the per-response classifier outputs ``source_prob`` / ``source_share`` ([B, K])
    needs_source: bool = False


WEIGHTING_RULES: dict[str, WeightingRule] = {
    "uniform": WeightingRule(uniform_weights, features="none", needs_val=False),
    "wpo": WeightingRule(wpo_weights, features="none", needs_val=False, needs_wpo=True, normalize=False),
    "iw_dpo_l": WeightingRule(iw_weights, features="loss", needs_val=True),
    "iw_dpo_r": WeightingRule(iw_weights, features="rewards", needs_val=True),
    "kl_dro": WeightingRule(kl_dro_weights, features="loss", needs_val=False, normalize=False),
    "dr_dpo": WeightingRule(dr_dpo_weights, features="loss", needs_val=False, normalize=False,
                            reduce=dr_dpo_objective),
    # DoRA (algorithms.md §4) and its two ablations: "DRO only" and "reweighting only"
    "dora": WeightingRule(dora_weights, features="loss", needs_val=False, normalize=False,
                          reduce=dora_reduce, reduce_needs_aux=True, needs_source=True),
    "dro": WeightingRule(dro_weights, features="loss", needs_val=False, normalize=False, reduce=dro_reduce),
    "dora_reweight": WeightingRule(dora_reweight_weights, features="none", needs_val=False, normalize=False,
                                   needs_source=True),
}
