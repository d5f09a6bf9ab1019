"""Penalty terms added to a reduced objective. Currently WDPO's Wasserstein dual term.

WDPO (Xu et al., NeurIPS 2025) regularises DPO by the norm of each pair's loss gradient with
respect to its **input token embeddings** (algorithms.md §3.2). With ``e`` the embeddings of
the chosen rows (first B) and rejected rows (next B), ``g = ∂(Σ_i L_i)/∂e``; since pair ``i``'s
loss depends only on its own two rows, ``g``'s rows are per-pair gradients (one VJP gives all
of them). Per pair ``P_i = ‖g_chosen,i‖²_F + ‖g_rejected,i‖²_F`` (prompt positions included;
padding has zero gradient). Two forms, both named:

* ``penalty="squared_mean"`` (authors' code, ``src/wdpo.py``): ``ρ · mean_i P_i``;
* ``penalty="sqrt_mean"`` (the paper's surrogate): ``ρ · sqrt(mean_i P_i)``.

The caller differentiates the total with respect to the parameters *through* ``g``
(reverse-over-reverse; ``create_graph=True`` in the authors' PyTorch). Pure: takes ``g``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from alignshift.losses.hparams import NONNEGATIVE, HParam

__all__ = ["PENALTIES", "PENALTY_HPARAMS", "GRADIENT_MODES", "wdpo_pair_penalties", "wdpo_penalty"]

PENALTY_KINDS = ("squared_mean", "sqrt_mean")


def wdpo_pair_penalties(embed_grads: jax.Array, n_pairs: int) -> jax.Array:
    """``P_i`` [n_pairs] from the embedding gradients ``[2·n_pairs (+extra rows), T, d]``."""
    if embed_grads.ndim != 3 or embed_grads.shape[0] < 2 * n_pairs:
        raise ValueError(f"embed_grads must be [>= 2*{n_pairs}, T, d]; got {tuple(embed_grads.shape)}")
    sq = jnp.sum(jnp.square(embed_grads.astype(jnp.float32)), axis=(1, 2))
    return sq[:n_pairs] + sq[n_pairs : 2 * n_pairs]


GRADIENT_MODES = ("exact", "forward_over_reverse", "finite_difference")


def check_penalty_pairs(pairs, gradient: str) -> None:
    """``pairs`` must be an int >= 0, and > 0 only with a first-order gradient mode."""
    if isinstance(pairs, bool) or not isinstance(pairs, int) or pairs < 0:
        raise ValueError(f"WDPO pairs must be an int >= 0 (0 = all pairs), got {pairs!r}")
    if pairs and gradient == "exact":
        raise ValueError(f"WDPO pairs={pairs} (a subsampled penalty gradient) needs gradient='finite_difference' "
                         "or 'forward_over_reverse', not 'exact'")


def wdpo_penalty(embed_grads: jax.Array, n_pairs: int, *, rho: float = 0.01, penalty: str = "squared_mean",
                 gradient: str = "exact", fd_eps: float = 1e-4, pairs: int = 0):
    """``(penalty scalar, P_i [n_pairs])`` — see the module docstring.

    ``gradient`` and ``fd_eps`` do not change the value; the train step reads them to choose
    how the penalty's parameter gradient is taken: ``"exact"`` (double back-propagation, the
    authors' ``create_graph=True``), ``"forward_over_reverse"`` (the same gradient, exact, as a
    Jacobian-vector product of the first-order gradient: one backward, then one
    forward-mode pass over it) or ``"finite_difference"`` (two first-order passes,
    ``∇θP ≈ [∇θΣL(e + εv) − ∇θΣL(e)]/ε`` with ``v = ∂P/∂g`` and ``‖εv‖ = fd_eps·‖e‖``; see
    :func:`alignshift.train.steps.wdpo_first_order_grads`).

    ``pairs = m > 0`` (first-order modes only): the penalty's *parameter gradient* is estimated
    from ``m`` pairs drawn uniformly without replacement each step (``n/m`` times their
    contribution: unbiased, since ``∇θP = Σ_i (∂g_i/∂θ)ᵀ v_i`` is a sum over pairs and ``v`` is
    computed exactly from all pairs' ``g``); the second pass then runs on ``m`` pairs instead
    of ``n``. The penalty's value and the base loss's gradient stay exact over the batch."""
    if penalty not in PENALTY_KINDS:
        raise ValueError(f"unknown WDPO penalty {penalty!r}; choose one of {PENALTY_KINDS}")
    if gradient not in GRADIENT_MODES:
        raise ValueError(f"unknown WDPO gradient mode {gradient!r}; choose one of {GRADIENT_MODES}")
    if not fd_eps > 0:
        raise ValueError(f"fd_eps must be > 0, got {fd_eps}")
    check_penalty_pairs(pairs, gradient)
    p = wdpo_pair_penalties(embed_grads, n_pairs)
    m = p.mean()
    # sqrt with a safe gradient at 0 (all-zero gradients, e.g. a saturated batch)
    agg = m if penalty == "squared_mean" else jnp.sqrt(jnp.maximum(m, 1e-20))
    return rho * agg, p


PENALTIES = {"wdpo": wdpo_penalty}

# each penalty's hyper-parameters (penalty_kwargs), validated by alignshift.losses.objective.check_hparams;
# ``penalty`` / ``gradient`` / ``pairs`` are further checked by make_objective (PENALTY_KINDS,
# GRADIENT_MODES, check_penalty_pairs), ``fd_eps > 0`` by wdpo_penalty
PENALTY_HPARAMS = {
    "wdpo": (
        HParam("rho", 0.01, ("float",), NONNEGATIVE),
        HParam("penalty", "squared_mean", ("str",)),
        HParam("gradient", "exact", ("str",)),
        HParam("fd_eps", 1e-4, ("float",)),
        HParam("pairs", 0, ("int",)),
    ),
}
