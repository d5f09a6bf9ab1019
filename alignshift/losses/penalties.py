"""Penalty terms added to a reduced objective. Currently WDPO's Wasserstein dual term.

WDPO (Xu et al., NeurIPS 2025) regularises DPO by the norm of each pair's loss gradient with
respect to its **input token embeddings** (docs/methods.md §3.2). With ``e`` the embeddings of
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

import dataclasses

import jax
import jax.numpy as jnp

from alignshift.losses.hparams import NONNEGATIVE, HParam

__all__ = ["PAIR_PENALTY", "PENALTIES", "PENALTY_FROM_PAIRS", "PENALTY_HPARAMS", "GRADIENT_MODES", "PenaltyGradient", "penalty_from_pairs",
           "penalty_is_mean", "wdpo_pair_penalties", "wdpo_penalty", "wdpo_penalty_from_pairs"]

PENALTY_KINDS = ("squared_mean", "sqrt_mean")


def wdpo_pair_penalties(embed_grads: jax.Array, n_pairs: int) -> jax.Array:
    """``P_i`` [n_pairs] from the embedding gradients ``[2·n_pairs (+extra rows), T, d]``."""
    if embed_grads.ndim != 3 or embed_grads.shape[0] < 2 * n_pairs:
        raise ValueError(f"embed_grads must be [>= 2*{n_pairs}, T, d]; got {tuple(embed_grads.shape)}")
    sq = jnp.sum(jnp.square(embed_grads.astype(jnp.float32)), axis=(1, 2))
    return sq[:n_pairs] + sq[n_pairs : 2 * n_pairs]


GRADIENT_MODES = ("exact", "forward_over_reverse", "finite_difference")


@dataclasses.dataclass(frozen=True)
class PenaltyGradient:
    """How the train step takes a penalty's parameter gradient — a training setting (config key
    ``methods.<i>.penalty_gradient``; ``make_preference_step(..., penalty_gradient=...)``), not a
    hyper-parameter of the objective: it never changes the loss, only how its gradient is
    computed. Validated here, the one place.

    * ``mode="exact"`` — double back-propagation through the embedding gradient (the authors'
      ``create_graph=True``);
    * ``mode="forward_over_reverse"`` — the same gradient, exact, as a Jacobian-vector product
      of the first-order gradient (one backward, then one forward-mode pass over it);
    * ``mode="finite_difference"`` — two first-order passes,
      ``∇θP ≈ [∇θΣL(e + εv) − ∇θΣL(e)]/ε`` with ``v = ∂P/∂g`` and ``‖εv‖ = fd_eps·‖e‖``;
    * ``pairs = m > 0`` (first-order modes only): the penalty's parameter gradient from ``m``
      pairs drawn uniformly without replacement each step, scaled ``n/m`` (unbiased, since
      ``∇θP = Σ_i (∂g_i/∂θ)ᵀ v_i`` and ``v`` is exact from all pairs); the penalty's value
      and the base loss's gradient stay exact over the batch.

    See :func:`alignshift.train.wdpo.wdpo_first_order_grads`."""

    mode: str = "exact"
    fd_eps: float = 1e-4
    pairs: int = 0

    def __post_init__(self):
        if self.mode not in GRADIENT_MODES:
            raise ValueError(f"unknown penalty gradient mode {self.mode!r}; choose one of {GRADIENT_MODES}")
        if isinstance(self.fd_eps, bool) or not isinstance(self.fd_eps, (int, float)) or not self.fd_eps > 0 \
                or self.fd_eps == float("inf"):
            raise ValueError(f"fd_eps must be a finite number > 0, got {self.fd_eps!r}")
        if isinstance(self.pairs, bool) or not isinstance(self.pairs, int) or self.pairs < 0:
            raise ValueError(f"pairs must be an int >= 0 (0 = all pairs), got {self.pairs!r}")
        if self.pairs and self.mode == "exact":
            raise ValueError(f"pairs={self.pairs} (a subsampled penalty gradient) needs mode='finite_difference' "
                             "or 'forward_over_reverse', not 'exact'")

    @property
    def first_order(self) -> bool:
        """Whether the gradient comes from first-order passes instead of double backprop."""
        return self.mode != "exact"

    @classmethod
    def from_dict(cls, d: dict | None) -> "PenaltyGradient":
        d = dict(d or {})
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown key(s) {unknown}; allowed: ['fd_eps', 'mode', 'pairs']")
        return cls(**d)


def wdpo_penalty(embed_grads: jax.Array, n_pairs: int, *, rho: float = 0.01, penalty: str = "squared_mean"):
    """``(penalty scalar, P_i [n_pairs])`` — see the module docstring. How the train step takes
    this penalty's parameter gradient is a training setting, :class:`PenaltyGradient`."""
    if penalty not in PENALTY_KINDS:
        raise ValueError(f"unknown WDPO penalty {penalty!r}; choose one of {PENALTY_KINDS}")
    p = wdpo_pair_penalties(embed_grads, n_pairs)
    return wdpo_penalty_from_pairs(p, rho=rho, penalty=penalty), p


def wdpo_penalty_from_pairs(p: jax.Array, *, rho: float = 0.01, penalty: str = "squared_mean") -> jax.Array:
    """The penalty from the per-pair terms ``P_i`` [n]: ``ρ·mean P`` or ``ρ·sqrt(mean P)``
    (gradient accumulation reduces the whole batch's ``P`` with it)."""
    m = p.mean()
    # sqrt with a safe gradient at 0 (all-zero gradients, e.g. a saturated batch)
    agg = m if penalty == "squared_mean" else jnp.sqrt(jnp.maximum(m, 1e-20))
    return rho * agg


def penalty_from_pairs(name: str, p: jax.Array, kwargs: dict) -> jax.Array:
    """Penalty ``name``'s value from its per-pair terms ``p`` [n] (see :data:`PENALTY_FROM_PAIRS`)."""
    return PENALTY_FROM_PAIRS[name](p, **kwargs)


def penalty_is_mean(name: str, kwargs: dict) -> bool:
    """Whether penalty ``name`` with ``kwargs`` is a plain mean of its per-pair terms (a sum over
    pairs: gradient accumulation may reduce each micro-batch on its own)."""
    return name == "wdpo" and kwargs.get("penalty", "squared_mean") == "squared_mean"


PENALTIES = {"wdpo": wdpo_penalty}
# the key of a batch's per-pair penalty terms among its per-example outputs (gradient accumulation)
PAIR_PENALTY = "pair_penalty"
# each penalty as a function of its per-pair terms (P [n], **penalty_kwargs) -> scalar
PENALTY_FROM_PAIRS = {"wdpo": wdpo_penalty_from_pairs}

# each penalty's hyper-parameters (penalty_kwargs), validated by alignshift.losses.objective.check_hparams;
# ``penalty`` is further checked by make_objective (PENALTY_KINDS)
PENALTY_HPARAMS = {
    "wdpo": (
        HParam("rho", 0.01, ("float",), NONNEGATIVE),
        HParam("penalty", "squared_mean", ("str",)),
    ),
}
