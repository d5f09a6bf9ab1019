"""Base preference losses (the DPO family), per example and unreduced.

Every function here is pure and jittable. Inputs are per-sequence log-probs (sums over
response tokens unless stated otherwise) of the policy and, where the loss has one, the
frozen reference. Each returns ``(losses [B], metrics)`` where ``metrics`` holds batch means
named as TRL names them. The internal ``*_terms`` functions additionally return the per-
example implicit rewards, which the batch weighting rules (IW-DPO-R, ...) use as features.

Notation (docs/methods.md §0): ``ρ(y) = log π(y) − log π_ref(y)``, implicit reward ``β·ρ``,
margin ``h = ρ(y_w) − ρ(y_l)``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "DPO_LOSS_TYPES",
    "PreferenceTerms",
    "dpo_terms",
    "dpo_loss",
    "SIMPO_PRESETS",
    "simpo_hparams",
    "simpo_terms",
    "simpo_loss",
    "kto_terms",
    "kto_loss",
    "pair_metrics",
]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


class PreferenceTerms(NamedTuple):
    """Per-example output of a base loss: losses and detached implicit rewards, all [B]."""

    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array


def _check_same_shape(**arrays) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    ref_name, ref_shape = next(iter(shapes.items()))
    if len(ref_shape) != 1:
        raise ValueError(f"{ref_name} must be a vector [B]; got shape {ref_shape}")
    for k, s in shapes.items():
        if s != ref_shape:
            raise ValueError(f"{k} has shape {s} but {ref_name} has shape {ref_shape}")


def pair_metrics(terms: PreferenceTerms, policy_chosen_logps, policy_rejected_logps) -> dict:
    """TRL-named batch means: rewards/{chosen,rejected,margins,accuracies}, logps/*."""
    c, r = terms.chosen_rewards, terms.rejected_rewards
    return {
        "rewards/chosen": c.mean(),
        "rewards/rejected": r.mean(),
        "rewards/margins": (c - r).mean(),
        "rewards/accuracies": (c > r).astype(jnp.float32).mean(),
        "logps/chosen": jax.lax.stop_gradient(policy_chosen_logps).mean(),
        "logps/rejected": jax.lax.stop_gradient(policy_rejected_logps).mean(),
    }


def dpo_terms(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
) -> PreferenceTerms:
    """Per-example DPO-family losses and implicit rewards; see :func:`dpo_loss`."""
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; choose one of {DPO_LOSS_TYPES}")
    eps = label_smoothing
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"loss_type='robust' needs 0 <= label_smoothing < 0.5; got {eps}")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing is only defined for 'sigmoid' and 'robust'; got {eps} with {loss_type!r}")

    ref_c = jax.lax.stop_gradient(reference_chosen_logps)
    ref_r = jax.lax.stop_gradient(reference_rejected_logps)
    rho_c = policy_chosen_logps - ref_c
    rho_r = policy_rejected_logps - ref_r
    h = rho_c - rho_r

    if loss_type == "sigmoid":
        losses = (1.0 - eps) * jax.nn.softplus(-beta * h) + eps * jax.nn.softplus(beta * h)
    elif loss_type == "robust":
        losses = ((1.0 - eps) * jax.nn.softplus(-beta * h) - eps * jax.nn.softplus(beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:  # hinge
        losses = jax.nn.relu(1.0 - beta * h)

    return PreferenceTerms(
        losses=losses,
        chosen_rewards=jax.lax.stop_gradient(beta * rho_c),
        rejected_rewards=jax.lax.stop_gradient(beta * rho_r),
    )


def dpo_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
):
    """DPO and its direct variants, per example.

    With ``h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))``:

    * ``"sigmoid"``: ``(1−ε)·softplus(−βh) + ε·softplus(βh)``. ε = ``label_smoothing``; ε = 0
      is DPO (Rafailov et al. 2023), ε > 0 is conservative DPO (cDPO), as the seed papers'
      code, OpenRLHF and TRL ≤ 0.24 compute it. Note: TRL ≥ 1.0 no longer applies label
      smoothing to "sigmoid"; to reproduce those numbers pass ``label_smoothing=0``.
    * ``"robust"``: Chowdhury et al. (2024) unbiased rDPO,
      ``[(1−ε)·softplus(−βh) − ε·softplus(βh)] / (1−2ε)``, ε ∈ [0, 0.5).
    * ``"ipo"``: ``(h − 1/(2β))²`` on whatever log-probs it is given. TRL's IPO averages the
      log-probs over response tokens: pass length-averaged log-probs (``mean_logps``) for that;
      the WDPO/KLDPO authors' code passes sums.
    * ``"hinge"``: ``max(0, 1 − βh)`` (SLiC).

    Reference log-probs are treated as constants (``stop_gradient``).

    Returns:
      ``(losses [B], metrics)``; metrics are batch means named as TRL names them:
      ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
      ``logps/chosen``, ``logps/rejected``. Rewards are ``β·(log π − log π_ref)``, detached.
    """
    terms = dpo_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    return terms.losses, pair_metrics(terms, policy_chosen_logps, policy_rejected_logps)


#: The two published SimPO configurations (``princeton-nlp/SimPO`` ``training_configs/``), by
#: name: ``mistral_base`` (``mistral-7b-base-simpo.yaml``: β 2.0, γ 1.6; lr 3e-7) and
#: ``llama3_instruct`` (``llama-3-8b-instruct-simpo.yaml``: β 2.5, γ/β 0.55, i.e. γ 1.375;
#: lr 1e-6). The learning rates are the optimiser's (``train.optim.lr``), not the loss's.
SIMPO_PRESETS: dict[str, dict[str, float]] = {
    "mistral_base": {"beta": 2.0, "gamma": 1.6},
    "llama3_instruct": {"beta": 2.5, "gamma_beta_ratio": 0.55},
}
SIMPO_DEFAULT_PRESET = "mistral_base"


def simpo_hparams(preset: str = SIMPO_DEFAULT_PRESET, beta: float | None = None, gamma: float | None = None,
                  gamma_beta_ratio: float | None = None) -> tuple[float, float]:
    """``(β, γ)`` of SimPO: the ``preset``'s values (:data:`SIMPO_PRESETS`), each overridden by
    an explicit argument. The margin: an explicit ``gamma`` (absolute), else an explicit
    ``gamma_beta_ratio``·β, else the preset's (its ``gamma``, or its ratio·β)."""
    if preset not in SIMPO_PRESETS:
        raise ValueError(f"unknown SimPO preset {preset!r}; choose one of {sorted(SIMPO_PRESETS)}")
    p = SIMPO_PRESETS[preset]
    b = p["beta"] if beta is None else beta
    if gamma is not None:
        return b, gamma
    if gamma_beta_ratio is not None:
        return b, gamma_beta_ratio * b
    return b, p["gamma"] if "gamma" in p else p["gamma_beta_ratio"] * b


def simpo_terms(
    policy_chosen_avg_logps,
    policy_rejected_avg_logps,
    *,
    beta: float | None = None,
    gamma: float | None = None,
    gamma_beta_ratio: float | None = None,
    label_smoothing: float = 0.0,
    preset: str = SIMPO_DEFAULT_PRESET,
) -> PreferenceTerms:
    """SimPO (Meng et al. 2024): reference-free, on length-normalised log-probs.

    ``softplus(−(β·Ŝ_w − β·Ŝ_l − γ))`` (with optional label smoothing as in the SimPO repo).
    ``γ`` is the absolute margin; ``gamma_beta_ratio`` gives it as ``γ/β`` (the SimPO repo's
    parametrisation; TRL's ``simpo_gamma`` is ``γ`` itself). Unset values come from ``preset``
    (:func:`simpo_hparams`): by default the Mistral-base configuration, β 2.0, γ 1.6 (the
    former defaults, β 2.0 and γ/β 0.55, matched neither published configuration).
    Implicit rewards are ``β·Ŝ``.
    """
    _check_same_shape(
        policy_chosen_avg_logps=policy_chosen_avg_logps, policy_rejected_avg_logps=policy_rejected_avg_logps
    )
    beta, g = simpo_hparams(preset, beta, gamma, gamma_beta_ratio)
    u = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - g
    eps = label_smoothing
    losses = (1.0 - eps) * jax.nn.softplus(-u) + eps * jax.nn.softplus(u)
    return PreferenceTerms(
        losses=losses,
        chosen_rewards=jax.lax.stop_gradient(beta * policy_chosen_avg_logps),
        rejected_rewards=jax.lax.stop_gradient(beta * policy_rejected_avg_logps),
    )


def simpo_loss(policy_chosen_avg_logps, policy_rejected_avg_logps, **hp):
    """SimPO per-example losses and TRL-named metrics; see :func:`simpo_terms`."""
    terms = simpo_terms(policy_chosen_avg_logps, policy_rejected_avg_logps, **hp)
    return terms.losses, pair_metrics(terms, policy_chosen_avg_logps, policy_rejected_avg_logps)


def _kto_reference_point(policy_kl_logps, reference_kl_logps, axis_name):
    """KTO's ``z₀ = max(0, mean_j (log π − log π_ref)(y'_j | x_j))``, detached.

    Under ``pmap``/``shard_map`` pass ``axis_name`` so the mean is over the global batch.
    """
    kl = (policy_kl_logps - reference_kl_logps).mean()
    if axis_name is not None:
        kl = jax.lax.pmean(kl, axis_name)
    return jax.lax.stop_gradient(jnp.maximum(kl, 0.0))


def kto_terms(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    policy_kl_logps,
    reference_kl_logps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    axis_name: str | None = None,
) -> tuple[PreferenceTerms, jax.Array]:
    """KTO on paired data: chosen responses are desirable, rejected ones undesirable.

    Per pair ``i`` the loss is ``½·[λ_D·(1 − σ(β(ρ_w − z₀))) + λ_U·(1 − σ(β(z₀ − ρ_l)))]``, so the
    batch mean equals TRL's mean over the 2B unpaired examples. ``z₀`` is estimated from
    mismatched completions (``policy_kl_logps``/``reference_kl_logps``, [M]); see
    :func:`kto_loss`. Returns the terms and ``z₀``.
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    _check_same_shape(policy_kl_logps=policy_kl_logps, reference_kl_logps=reference_kl_logps)
    z0 = _kto_reference_point(policy_kl_logps, jax.lax.stop_gradient(reference_kl_logps), axis_name)
    rho_c = policy_chosen_logps - jax.lax.stop_gradient(reference_chosen_logps)
    rho_r = policy_rejected_logps - jax.lax.stop_gradient(reference_rejected_logps)
    loss_d = 1.0 - jax.nn.sigmoid(beta * (rho_c - z0))
    loss_u = 1.0 - jax.nn.sigmoid(beta * (z0 - rho_r))
    losses = 0.5 * (desirable_weight * loss_d + undesirable_weight * loss_u)
    terms = PreferenceTerms(
        losses=losses,
        chosen_rewards=jax.lax.stop_gradient(beta * rho_c),
        rejected_rewards=jax.lax.stop_gradient(beta * rho_r),
    )
    return terms, z0


def kto_loss(
    policy_chosen_logps,
    policy_rejected_logps,
    reference_chosen_logps,
    reference_rejected_logps,
    policy_kl_logps,
    reference_kl_logps,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    axis_name: str | None = None,
):
    """KTO (Ethayarajh et al. 2024) as TRL computes it, on paired data.

    ``policy_kl_logps``/``reference_kl_logps`` are log-probs of mismatched completions
    (prompt ``x_i`` with the completion of another example), giving the reference point
    ``z₀ = max(0, mean(log π − log π_ref))`` (detached, averaged over ``axis_name`` when given).
    Desirable: ``λ_D·(1 − σ(β(ρ − z₀)))``; undesirable: ``λ_U·(1 − σ(β(z₀ − ρ)))``.
    Keep ``λ_D·n_D / (λ_U·n_U)`` in [1, 4/3] (KTO paper).

    Returns ``(losses [B], metrics)`` with the pair metrics plus ``kl`` (= z₀).
    """
    terms, z0 = kto_terms(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        policy_kl_logps,
        reference_kl_logps,
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        axis_name=axis_name,
    )
    metrics = pair_metrics(terms, policy_chosen_logps, policy_rejected_logps)
    metrics["kl"] = z0
    return terms.losses, metrics

