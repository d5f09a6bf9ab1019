"""DoRA (Zhu, Liu, Fu, Zhang, Mao; NeurIPS 2025): distribution-aware robust alignment.

The calibrated log-mean-exp objective ``λ·log mean_j exp(H_j·ℓ_j/λ)`` over any base loss
(docs/methods.md §4), where ``H_j`` is the mean over example ``j``'s responses of the
calibration weight ``h̃ = p/(α·p + a·(1 − p))`` from a source classifier's probability ``p``
(:mod:`alignshift.rewards.source_classifier`). This module holds:

* :func:`dora_calibration` (``h̃`` per response) and :func:`dora_pair_weights` (``H`` per
  example, from the batch's ``source_prob`` / ``source_share``); :func:`pair_weight_columns`
  (which responses' columns a pair's ``H`` averages: the ``pair_weight`` flag below);
* :func:`dora_objective` — the calibrated log-mean-exp of given losses and weights;
* the weighting rules (interface: :mod:`alignshift.losses.reduction`), registered in
  :data:`DORA_RULES` and thus in :data:`alignshift.losses.weighting.WEIGHTING_RULES`:

  =================  ================================  =========================================
  key                rule                              objective
  =================  ================================  =========================================
  ``dora``           :func:`dora_rule`                 ``λ·log mean_j exp(H_j·ℓ_j/λ)`` (``form``:
                                                       the authors' other reductions, §4.2)
  ``dro``            :func:`dora_dro_only_rule`        "DRO only" ablation: ``λ·log mean exp(ℓ/λ)``
                                                       (no calibration; UP-weights high losses)
  ``dora_reweight``  :func:`dora_reweight_only_rule`   "reweighting only" ablation: ``mean_j H_j·ℓ_j``
  =================  ================================  =========================================

**The pairwise weight on K-candidate data** (flag ``pair_weight`` of ``dora`` and
``dora_reweight``; both experiments use this one definition). When a pairwise loss trains on the
best-vs-worst pair of a prompt's K candidates (K = 4 in the released code), ``H_j`` is

* ``"candidates"`` (default; the authors' code, ``train_mistral_prompt.py``, DPO branch [V-code]):
  the mean of ``h̃`` over ALL K candidates of the prompt — the prompt is the data point;
* ``"pair"``: the mean over the pair's own two responses — the paper's ``h̃(z)`` of the data
  point ``z = (x, y_w, y_l)`` that the loss is computed on [INFER: the paper (read second-hand)
  does not say how a pair's two responses combine; it defines ``h̃`` per sample].

The experiments store the K columns of every pair (``source_prob`` / ``source_share``
``[N, K]``) and select the pair's two with :func:`pair_weight_columns` for ``"pair"``. With K = 2
data, or listwise losses (the list is the data point), the two coincide.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from alignshift.losses.hparams import POSITIVE, HParam
from alignshift.losses.reduction import WeightingRule, gather_batch, linear_rule, log_mean_exp, normalize_weights

__all__ = [
    "DORA_FORMS",
    "DORA_PAIR_WEIGHTS",
    "pair_weight_columns",
    "DORA_RULES",
    "DORA_CHOICES",
    "dora_calibration",
    "dora_pair_weights",
    "dora_objective",
    "dora_rule",
    "dora_dro_only_rule",
    "dora_reweight_only_weights",
    "dora_reweight_only_rule",
]

DORA_FORMS = ("spec", "lire_code", "rrhf_code")
DORA_PAIR_WEIGHTS = ("candidates", "pair")


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def dora_calibration(p, *, alpha, source_share, eps: float = 1e-6):
    """DoRA's calibration weight per response (docs/methods.md §4.2):

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


def pair_weight_columns(prob, share, pair_cols, pair_weight: str = "candidates"):
    """The ``(source_prob, source_share)`` columns a pairwise example's ``H`` averages over.

    ``prob`` / ``share``: ``[N, K]``, every candidate of each example's prompt; ``pair_cols``:
    ``[N, 2]`` the columns of the pair's chosen and rejected response (None when the data has
    no K-candidate lists). ``"candidates"`` (the authors' code) returns all K columns, ``"pair"``
    the pair's own two (:data:`DORA_PAIR_WEIGHTS`; the module docstring has both)."""
    if pair_weight not in DORA_PAIR_WEIGHTS:
        raise ValueError(f"unknown DoRA pair_weight {pair_weight!r}; choose one of {DORA_PAIR_WEIGHTS}")
    prob, share = np.asarray(prob), np.asarray(share)
    if pair_weight == "candidates" or prob.shape[-1] == 2:
        return prob, share
    if pair_cols is None:
        raise ValueError(f"pair_weight='pair' needs each pair's chosen and rejected candidate columns, but the "
                         f"data has {prob.shape[-1]} candidate columns per example and no pair indices")
    cols = np.asarray(pair_cols, np.int64)
    if cols.shape != (prob.shape[0], 2):
        raise ValueError(f"pair columns must be [N, 2] = [{prob.shape[0]}, 2]; got {list(cols.shape)}")
    return np.take_along_axis(prob, cols, 1), np.take_along_axis(share, cols, 1)


def dora_pair_weights(aux: dict, *, alpha: float, pair_weight: str = "candidates") -> jax.Array:
    """Per-example (per pair / per prompt) weight ``H_j = mean_k h̃_{j,k}`` over the example's
    response columns (the authors' code for DPO, BT and PL), from ``aux["source_prob"]`` and
    ``aux["source_share"]`` (``[B, K]``; K = 2 for pairs: chosen, rejected; or ``[B]``).
    ``pair_weight="pair"`` on a pairwise batch insists on the pair's own two columns (K = 2;
    :func:`pair_weight_columns` selects them): given all K candidates it raises instead of
    silently averaging over them."""
    if aux is None or "source_prob" not in aux or "source_share" not in aux:
        have = sorted(aux) if aux is not None else []
        raise ValueError("DoRA needs the per-response classifier outputs 'source_prob' and 'source_share' "
                         f"in the batch (see alignshift.rewards.source_classifier); the inputs hold {have}")
    if pair_weight not in DORA_PAIR_WEIGHTS:
        raise ValueError(f"unknown DoRA pair_weight {pair_weight!r}; choose one of {DORA_PAIR_WEIGHTS}")
    prob = aux["source_prob"]
    if pair_weight == "pair" and "policy_chosen_logps" in aux and jnp.ndim(prob) == 2 and jnp.shape(prob)[-1] != 2:
        raise ValueError(f"DoRA pair_weight='pair' averages h over the pair's own two responses, but the batch "
                         f"has {jnp.shape(prob)[-1]} source columns per pair (select them with "
                         "alignshift.losses.dora.pair_weight_columns)")
    h = dora_calibration(prob, alpha=alpha, source_share=aux["source_share"])
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
    return log_mean_exp(gather_batch(h * losses, axis_name), lam)


def dora_rule(losses, features=None, *, val_features=None, aux=None, data_weight=None, lam: float = 1.0,
              alpha: float = 0.25, form: str = "spec", pair_weight: str = "candidates",
              axis_name: str | None = None):
    """The ``dora`` rule, on ``L = d·ℓ`` (data-weighted losses). ``form="spec"`` (default):
    ``λ·log mean_j exp(H_j·L_j/λ)`` with ``H_j = mean_k h̃_{j,k}`` (the model of §4.1; the
    authors' DPO/PL code; effective weights ``n·softmax(H·L/λ)·H``). The authors' other
    reductions, for parity: ``"lire_code"`` = ``λ·mean(h̃)·log mean_j exp(L_j/λ)`` (calibration
    outside the log-mean-exp), ``"rrhf_code"`` = ``λ·log mean_{j,k} exp(h̃_{j,k}·mean_j L_j/λ)``
    (the weights multiply the batch-mean loss) (§4.2). ``pair_weight``: which responses a
    pair's ``H`` averages (module docstring)."""
    del features, val_features
    if form not in DORA_FORMS:
        raise ValueError(f"unknown DoRA form {form!r}; choose one of {DORA_FORMS}")
    losses = losses if data_weight is None else data_weight * losses
    if form == "spec":
        return dora_objective(losses, dora_pair_weights(aux, alpha=alpha, pair_weight=pair_weight), lam=lam,
                              axis_name=axis_name)
    h = dora_calibration(aux["source_prob"], alpha=alpha, source_share=aux["source_share"])
    L = gather_batch(losses, axis_name)
    h = gather_batch(h, axis_name)
    if form == "lire_code":
        return jnp.mean(h) * log_mean_exp(L, lam)
    return log_mean_exp(jnp.ravel(h) * jnp.mean(L), lam)


def dora_dro_only_rule(losses, features=None, *, val_features=None, aux=None, data_weight=None, lam: float = 1.0,
                       axis_name: str | None = None):
    """DoRA's "DRO only" ablation (the ``dro`` rule): vanilla KL-DRO at a fixed dual variable,
    ``λ·log mean_i exp(L_i/λ)`` with ``L = d·ℓ``, no calibration. UP-weights HIGH-loss examples
    (effective weights ``n·softmax(L/λ)``), the opposite of Dr.DPO's soft-min."""
    del features, val_features, aux
    losses = losses if data_weight is None else data_weight * losses
    return log_mean_exp(gather_batch(losses, axis_name), lam)


def dora_reweight_only_weights(train_features, *, val_features=None, aux=None, alpha: float = 0.25,
                               normalize: bool = False, pair_weight: str = "candidates"):
    """DoRA's "reweighting only" ablation's weights: the calibration weights ``H_j`` (raw, with
    ``normalize=False`` as the ablation writes it; ``normalize=True`` rescales them to mean 1
    per batch). The rule is ``mean_j H_j·ℓ_j``. ``pair_weight`` as for ``dora``."""
    del train_features, val_features
    w = jax.lax.stop_gradient(dora_pair_weights(aux, alpha=alpha, pair_weight=pair_weight))
    return normalize_weights(w) if normalize else w


dora_reweight_only_rule = linear_rule(dora_reweight_only_weights, normalize=False)

_LAM = HParam("lam", 1.0, ("float",), POSITIVE)
_ALPHA = HParam("alpha", 0.25, ("float",))  # in (0, 1]: checked by dora_calibration
_PAIR_WEIGHT = HParam("pair_weight", "candidates", ("str",))  # one of DORA_PAIR_WEIGHTS

DORA_RULES: dict[str, WeightingRule] = {
    "dora": WeightingRule(dora_rule, features="loss", requires=frozenset({"source"}), collectives=True,
                          hparams=(_LAM, _ALPHA, HParam("form", "spec", ("str",)), _PAIR_WEIGHT)),
    "dro": WeightingRule(dora_dro_only_rule, features="loss", collectives=True, hparams=(_LAM,)),
    "dora_reweight": WeightingRule(dora_reweight_only_rule, requires=frozenset({"source"}),
                                   hparams=(_ALPHA, HParam("normalize", False, ("bool",)), _PAIR_WEIGHT)),
}

#: the string hyper-parameters' allowed values, checked by ``make_objective`` (config errors name the key)
DORA_CHOICES = {("dora", "pair_weight"): DORA_PAIR_WEIGHTS, ("dora_reweight", "pair_weight"): DORA_PAIR_WEIGHTS}
