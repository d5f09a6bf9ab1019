"""Listwise preference losses over K candidates per prompt: Plackett–Luce DPO, RRHF, LIRE.

These are the listwise base losses DoRA plugs its calibrated robust reduction into
(docs/methods.md §4.1–4.2). Every function is pure and jittable and returns per-PROMPT losses
``[B]`` (unreduced), so any weighting rule of :mod:`alignshift.losses.weighting` composes
with them exactly as with the pairwise losses.

Layout: log-probs etc. are ``[B, K]``: prompt ``b``'s ``K`` candidates (fixed ``K`` per
batch). ``scores [B, K]`` are the judge's rewards of the candidates (higher = better). When
``scores`` is ``None`` the candidates are taken as already ranked, best first (column 0).
Ties in ``scores`` are broken by column order (a stable sort), so ranking-based losses see
one fixed order.

Implicit rewards (used for pair metrics and for held-out preference accuracy):

=========  ======================================  =========================================
loss       per-candidate implicit reward           reference model
=========  ======================================  =========================================
PL-DPO     ``β·(log π(y) − log π_ref(y))``          yes
RRHF       ``log π(y) / |y|`` (length-normalised)   no
LIRE       ``log π(y) / T``                         no
=========  ======================================  =========================================

Conventions where the paper(s) and the DoRA authors' code differ are named flags:

* PL-DPO ``reduction``: ``"mean"`` (authors' code: ``1/K`` times the sum of the K
  position terms, the always-zero last term included; with K = 2 this is exactly
  ``½ × DPO``) or ``"sum"`` (the DPO paper's Plackett–Luce likelihood; with K = 2 it is
  exactly DPO).
* RRHF ``sft_candidate``: ``"best"`` (the RRHF paper: the highest-scored candidate) or an
  integer column (the DoRA code uses ``K − 2``); ``sft_length``: ``None`` (mean over the
  candidate's response tokens) or an int (the DoRA code divides by every position of the
  padded sequence, masked ones included, a quirk).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignshift.losses.preference import PreferenceTerms, pair_metrics

__all__ = [
    "PL_REDUCTIONS",
    "rank_by_scores",
    "reverse_logcumsumexp",
    "plackett_luce_terms",
    "plackett_luce_loss",
    "rrhf_terms",
    "rrhf_loss",
    "lire_terms",
    "lire_loss",
    "listwise_metrics",
]

PL_REDUCTIONS = ("mean", "sum")


def _check_lists(**arrays) -> tuple[int, int]:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None}
    name, shape = next(iter(shapes.items()))
    if len(shape) != 2:
        raise ValueError(f"{name} must be [B, K] (K candidates per prompt); got shape {shape}")
    if shape[1] < 2:
        raise ValueError(f"{name} has K = {shape[1]} candidates; listwise losses need K >= 2")
    for k, s in shapes.items():
        if s != shape:
            raise ValueError(f"{k} has shape {s} but {name} has shape {shape}")
    return shape


def rank_by_scores(scores, *arrays):
    """Reorder every ``[B, K]`` array in ``arrays`` by ``scores`` descending (stable: ties keep
    column order). ``scores=None`` returns the arrays unchanged (already ranked)."""
    if scores is None:
        return arrays
    order = jnp.argsort(-jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32)), axis=-1, stable=True)
    return tuple(None if a is None else jnp.take_along_axis(a, order, axis=-1) for a in arrays)


def reverse_logcumsumexp(x, axis: int = -1):
    """``out[..., k] = log Σ_{j ≥ k} exp(x[..., j])``, computed stably (no overflow for large
    ``x``, no ``log 0`` for very negative ``x``) with ``lax.cumlogsumexp(reverse=True)``."""
    return jax.lax.cumlogsumexp(x, axis=axis % jnp.ndim(x), reverse=True)


def _top_bottom(ranked):
    return ranked[:, 0], ranked[:, -1]


def plackett_luce_terms(
    policy_logps,
    reference_logps,
    scores=None,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
) -> PreferenceTerms:
    """Plackett–Luce DPO (DPO-PL) per prompt; see :func:`plackett_luce_loss`."""
    _check_lists(policy_logps=policy_logps, reference_logps=reference_logps, scores=scores)
    if reduction not in PL_REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {PL_REDUCTIONS}")
    pol, ref = rank_by_scores(scores, policy_logps, jax.lax.stop_gradient(reference_logps))
    s = beta * (pol - ref)  # [B, K] implicit rewards in rank order
    terms = s - reverse_logcumsumexp(s, axis=-1)  # log-prob of candidate k being picked next
    losses = -terms.sum(-1)
    if reduction == "mean":
        losses = losses / s.shape[-1]
    top, bottom = _top_bottom(jax.lax.stop_gradient(s))
    return PreferenceTerms(losses=losses, chosen_rewards=top, rejected_rewards=bottom)


def plackett_luce_loss(
    policy_logps,
    reference_logps,
    scores=None,
    *,
    beta: float = 0.1,
    reduction: str = "mean",
):
    """Plackett–Luce DPO (Rafailov et al. 2023, App. A.3; DoRA's DPO-PL), per prompt.

    Rank the K candidates by ``scores`` (descending; ``None`` = already ranked) and let
    ``s_k = β·(log π(y_(k)) − log π_ref(y_(k)))``. The loss is the negative PL log-likelihood
    of that ranking under the implicit rewards,

        L = −Σ_{k=1}^{K} [ s_k − log Σ_{j ≥ k} exp(s_j) ]           (reduction="sum")

    divided by K for ``reduction="mean"`` (the default: the DoRA authors' code, which keeps the
    identically-zero ``k = K`` term in the 1/K). The inner log-sum-exp is a stable reverse
    ``logcumsumexp`` (the authors' code exponentiates and cum-sums, which overflows).

    With K = 2 (``scores`` ranking ``y_w`` first): ``"sum"`` is exactly the sigmoid DPO loss
    ``softplus(−β h)`` and ``"mean"`` is exactly ``½ × DPO``.

    Inputs are ``[B, K]`` per-sequence log-prob sums; reference log-probs are constants.
    Returns ``(losses [B], metrics)`` with the TRL-named pair metrics of the top- vs
    bottom-ranked candidate (``rewards/chosen`` = mean implicit reward of the best-scored
    candidate, ``rewards/rejected`` of the worst).
    """
    t = plackett_luce_terms(policy_logps, reference_logps, scores, beta=beta, reduction=reduction)
    return t.losses, listwise_metrics(t, policy_logps, scores)


def rrhf_terms(
    policy_logps,
    n_tokens,
    scores=None,
    *,
    sft_weight: float = 1.0,
    sft_candidate: str | int = "best",
    sft_length: int | None = None,
) -> PreferenceTerms:
    """RRHF per prompt; see :func:`rrhf_loss`."""
    B, K = _check_lists(policy_logps=policy_logps, n_tokens=n_tokens, scores=scores)
    if sft_candidate != "best" and not (isinstance(sft_candidate, int) and -K <= sft_candidate < K):
        raise ValueError(f"sft_candidate must be 'best' or a column index in [-{K}, {K}); got {sft_candidate!r}")
    if sft_length is not None and (isinstance(sft_length, bool) or not isinstance(sft_length, int) or sft_length < 1):
        raise ValueError(f"sft_length must be None or a positive int; got {sft_length!r}")
    n = jnp.maximum(n_tokens.astype(jnp.float32), 1.0)
    q = policy_logps / n  # length-normalised log-prob, [B, K]
    if scores is None:  # already ranked best first: candidate i beats j iff i < j
        idx = jnp.arange(K)
        better = jnp.broadcast_to(idx[:, None] < idx[None, :], (B, K, K))
        best = jnp.zeros((B,), jnp.int32)
    else:
        r = jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32))
        better = r[:, :, None] > r[:, None, :]  # better[b, j, i]: r_j > r_i
        best = jnp.argmax(r, axis=-1)  # first maximum on ties
    # max(0, q_i − q_j) for every (j better than i)
    hinge = jax.nn.relu(q[:, None, :] - q[:, :, None])  # [b, j, i] = q_i − q_j
    rank = jnp.where(better, hinge, 0.0).sum((1, 2)) / K
    col = best if sft_candidate == "best" else jnp.full((B,), sft_candidate % K, jnp.int32)
    sum_lp = jnp.take_along_axis(policy_logps, col[:, None], axis=-1)[:, 0]
    denom = jnp.take_along_axis(n, col[:, None], axis=-1)[:, 0] if sft_length is None else float(sft_length)
    sft = -sum_lp / denom
    losses = rank + sft_weight * sft
    qs, = rank_by_scores(scores, q)
    top, bottom = _top_bottom(jax.lax.stop_gradient(qs))
    return PreferenceTerms(losses=losses, chosen_rewards=top, rejected_rewards=bottom)


def rrhf_loss(
    policy_logps,
    n_tokens,
    scores=None,
    *,
    sft_weight: float = 1.0,
    sft_candidate: str | int = "best",
    sft_length: int | None = None,
):
    """RRHF (Yuan et al. 2023) as in the DoRA code, per prompt; reference-free.

    With ``q_k = log π(y_k)/|y_k|`` (length-normalised) and judge scores ``r``:

        L = (1/K)·Σ_{(i, j): r_j > r_i} max(0, q_i − q_j)  +  sft_weight · NLL(y_sft)

    where ``NLL(y_sft) = −log π(y_sft)/|y_sft|`` is the mean token NLL of the SFT candidate
    (``sft_candidate="best"``: the highest-scored one, the RRHF paper; an int: that column,
    the DoRA code uses ``K − 2``). ``sft_length`` replaces ``|y_sft|`` by a fixed number of
    positions (the DoRA code's mean over all padded positions). Strictly ordered pairs only:
    tied scores contribute no ranking term.

    Inputs: ``policy_logps`` / ``n_tokens`` ``[B, K]`` (sum log-probs over response tokens and
    their count). Returns ``(losses [B], metrics)``.
    """
    t = rrhf_terms(policy_logps, n_tokens, scores, sft_weight=sft_weight, sft_candidate=sft_candidate,
                   sft_length=sft_length)
    return t.losses, listwise_metrics(t, policy_logps, scores)


def lire_terms(policy_logps, scores, *, temperature: float = 2.0) -> PreferenceTerms:
    """LIRE per prompt; see :func:`lire_loss`."""
    _check_lists(policy_logps=policy_logps, scores=scores)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    z = policy_logps / temperature
    q = jax.nn.softmax(z, axis=-1)
    target = jax.nn.softmax(jax.lax.stop_gradient(jnp.asarray(scores, jnp.float32)), axis=-1)
    losses = -(q * target).sum(-1) / z.shape[-1]
    zs, = rank_by_scores(scores, z)
    top, bottom = _top_bottom(jax.lax.stop_gradient(zs))
    return PreferenceTerms(losses=losses, chosen_rewards=top, rejected_rewards=bottom)


def lire_loss(policy_logps, scores, *, temperature: float = 2.0):
    """LIRE (Zhu et al. 2024) as in the DoRA code, per prompt; reference-free.

        Q = softmax_k(log π(y_k) / T),   L = −(1/K)·Σ_k Q_k · softmax_k(r)_k,   T = 2.

    ``scores`` (the judge's rewards, their scale matters through the softmax) are required.
    Returns ``(losses [B], metrics)``.
    """
    t = lire_terms(policy_logps, scores, temperature=temperature)
    return t.losses, listwise_metrics(t, policy_logps, scores)


def listwise_metrics(terms: PreferenceTerms, policy_logps, scores=None) -> dict:
    """TRL-named pair metrics of the best- vs worst-scored candidate (``logps/*`` too)."""
    lp, = rank_by_scores(scores, jax.lax.stop_gradient(policy_logps))
    return pair_metrics(terms, lp[:, 0], lp[:, -1])
