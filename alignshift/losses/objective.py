"""``make_objective``: a base preference loss combined by a batch weighting rule.

    objective(batch) = rule(ℓ_base,1..B)   [+ penalty]

where the weighting rule (:mod:`alignshift.losses.weighting`) returns one scalar: a linear
``mean_i w_i·ℓ_i`` with detached weights, or a log-mean-exp (DR-DPO, DoRA); its effective
per-example weights ``n·∂objective/∂ℓ`` are logged as ``weights/{min,max,ess}``.

The penalty (WDPO's gradient-norm term, :mod:`alignshift.losses.penalties`) needs the
model's input embeddings, so the train step computes it (``alignshift.train.steps``); the
objective only records which penalty and its ``penalty_kwargs`` (``rho``, ``penalty="squared_mean"|"sqrt_mean"``).

The returned :class:`Objective` is a pure function of a dict of per-sequence log-probs::

    inputs = {
      "policy_chosen_logps", "policy_rejected_logps",       # [B] sums over response tokens
      "reference_chosen_logps", "reference_rejected_logps", # [B] (not needed by SimPO)
      "chosen_n_tokens", "rejected_n_tokens",               # [B] response lengths
      "policy_kl_logps", "reference_kl_logps",              # [B] mismatched completions (KTO)
      "weight",                                             # [B] optional per-example data weights
    }

and returns ``(loss, metrics)``. Base losses:

=========  ==========================================================================
name       loss (see :mod:`alignshift.losses.preference`)
=========  ==========================================================================
dpo        sigmoid DPO; ``label_smoothing`` ε > 0 gives conservative DPO
cdpo       sigmoid DPO with ``label_smoothing`` default 0.1
robust     Chowdhury et al. rDPO (``label_smoothing`` default 0.1)
ipo        IPO; ``length_normalize=True`` (default) uses per-token mean log-probs as TRL does
hinge      SLiC hinge
simpo      SimPO, reference-free, mean log-probs, margin γ; ``preset`` = a published configuration
kto        KTO on paired data, reference point from mismatched completions
pl         listwise Plackett–Luce DPO over K candidates (:mod:`alignshift.losses.listwise`)
rrhf       listwise RRHF (ranking hinge on length-normalised log-probs + SFT term)
lire       listwise LIRE (softmax of log-probs vs softmax of judge scores)
=========  ==========================================================================

Listwise bases read ``[B, K]`` inputs ``policy_logps``, ``reference_logps``, ``n_tokens`` and
``scores`` (the judge's rewards; see :func:`alignshift.train.steps.policy_inputs` for the
``cand_*`` batch layout). Given pairwise inputs instead they treat each pair as a list of
K = 2 ranked ``(chosen, rejected)`` (scores ``(1, 0)``), so a listwise objective also scores
held-out pairs. Weighting rules with ``needs_source`` (DoRA) also read ``source_prob`` /
``source_share`` (``[B, K]``) from the inputs.

What inputs an objective needs is declared by :attr:`Objective.requires`, a set of the kinds
in :data:`REQUIREMENTS` (the union of its base loss's and its weighting rule's). Each base
loss, rule and penalty declares its hyper-parameters (:class:`~alignshift.losses.hparams.HParam`:
name, default, types, range) next to its registration; :func:`check_hparams` validates
kwargs against them and :func:`make_objective` calls it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from alignshift.losses.dora import DORA_CHOICES
from alignshift.losses.hparams import NONNEGATIVE, POSITIVE, HParam, HParamError
from alignshift.losses.listwise import lire_terms, plackett_luce_terms, rank_by_scores, rrhf_terms
from alignshift.losses.logps import mean_logps
from alignshift.losses.preference import (
    SIMPO_DEFAULT_PRESET,
    SIMPO_PRESETS,
    PreferenceTerms,
    dpo_terms,
    kto_terms,
    pair_metrics,
    simpo_terms,
)
from alignshift.losses.penalties import PENALTIES, PENALTY_HPARAMS, PENALTY_KINDS
from alignshift.losses.reduction import reduce_losses, weight_stats
from alignshift.losses.weighting import WEIGHTING_RULES

__all__ = ["BASE_LOSSES", "REQUIREMENTS", "BaseLossSpec", "Objective", "check_hparams", "hparam_specs",
           "make_objective"]

REQUIREMENTS: dict[str, str] = {
    "reference": "reference log-probs of every sequence group (reference_*_logps)",
    "kl_completions": "KTO's mismatched kl_* completions (policy_kl_logps / reference_kl_logps)",
    "wpo_terms": "WPO's per-sequence log-weight terms (policy_chosen_wpo / policy_rejected_wpo)",
    "val_batch": "a deployment/validation batch whose features the weighting rule reads (val_inputs)",
    "source": "DoRA's per-response classifier outputs source_prob / source_share ([B, K])",
    "lists": "a listwise base loss: accepts the cand_* [B, K, T] layout (policy_logps [B, K], ...)",
}
"""The kinds of inputs an :class:`Objective` may require (:attr:`Objective.requires`)."""


def _dpo_like(loss_type: str, default_smoothing: float = 0.0):
    def fn(inputs, *, beta=0.1, label_smoothing=default_smoothing):
        t = dpo_terms(
            inputs["policy_chosen_logps"],
            inputs["policy_rejected_logps"],
            inputs["reference_chosen_logps"],
            inputs["reference_rejected_logps"],
            beta=beta,
            loss_type=loss_type,
            label_smoothing=label_smoothing,
        )
        return t, {}

    return fn


def _ipo(inputs, *, beta=0.1, length_normalize=True):
    keys = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    vals = [inputs[k] for k in keys]
    if not length_normalize:
        return dpo_terms(*vals, beta=beta, loss_type="ipo"), {}
    n = [inputs["chosen_n_tokens"], inputs["rejected_n_tokens"]] * 2
    t = dpo_terms(*[mean_logps(v, m) for v, m in zip(vals, n)], beta=beta, loss_type="ipo")
    # The loss uses per-token log-ratios; the logged implicit rewards stay β·(log π − log π_ref)
    # summed over the response, as TRL logs them (tests/test_trl_parity.py).
    pc, pr, rc, rr = vals
    sg = jax.lax.stop_gradient
    return t._replace(chosen_rewards=sg(beta * (pc - rc)), rejected_rewards=sg(beta * (pr - rr))), {}


def _simpo(inputs, *, preset=SIMPO_DEFAULT_PRESET, beta=None, gamma=None, gamma_beta_ratio=None,
           label_smoothing=0.0):
    c = mean_logps(inputs["policy_chosen_logps"], inputs["chosen_n_tokens"])
    r = mean_logps(inputs["policy_rejected_logps"], inputs["rejected_n_tokens"])
    t = simpo_terms(c, r, beta=beta, gamma=gamma, gamma_beta_ratio=gamma_beta_ratio, label_smoothing=label_smoothing,
                    preset=preset)
    return t, {}


def _kto(inputs, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, axis_name=None):
    t, z0 = kto_terms(
        inputs["policy_chosen_logps"],
        inputs["policy_rejected_logps"],
        inputs["reference_chosen_logps"],
        inputs["reference_rejected_logps"],
        inputs["policy_kl_logps"],
        inputs["reference_kl_logps"],
        beta=beta,
        desirable_weight=desirable_weight,
        undesirable_weight=undesirable_weight,
        axis_name=axis_name,
    )
    return t, {"kl": z0}


def _lists(inputs, needs_reference=True):
    """``(policy, reference, n_tokens, scores)`` as ``[B, K]`` from listwise inputs, or from
    pairwise inputs as ranked K = 2 lists (chosen first, scores ``(1, 0)``)."""
    if "policy_logps" in inputs:
        ref = inputs["reference_logps"] if needs_reference else None
        return inputs["policy_logps"], ref, inputs["n_tokens"], inputs.get("scores")
    pol = jnp.stack([inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]], -1)
    ref = (jnp.stack([inputs["reference_chosen_logps"], inputs["reference_rejected_logps"]], -1)
           if needs_reference else None)
    n = jnp.stack([inputs["chosen_n_tokens"], inputs["rejected_n_tokens"]], -1)
    scores = jnp.broadcast_to(jnp.asarray([1.0, 0.0], jnp.float32), pol.shape)
    return pol, ref, n, scores


def _pl(inputs, *, beta=0.1, reduction="mean"):
    pol, ref, _, scores = _lists(inputs)
    return plackett_luce_terms(pol, ref, scores, beta=beta, reduction=reduction), {}


def _rrhf(inputs, *, sft_weight=1.0, sft_candidate="best", sft_length=None):
    pol, _, n, scores = _lists(inputs, needs_reference=False)
    return rrhf_terms(pol, n, scores, sft_weight=sft_weight, sft_candidate=sft_candidate, sft_length=sft_length), {}


def _lire(inputs, *, temperature=2.0):
    pol, _, _, scores = _lists(inputs, needs_reference=False)
    if scores is None:
        raise ValueError("base loss 'lire' needs the candidates' judge scores (inputs['scores'])")
    return lire_terms(pol, scores, temperature=temperature), {}


def _pair_logps(inputs):
    """Policy log-probs of (chosen, rejected), or of the best / worst-scored candidate."""
    if "policy_chosen_logps" in inputs:
        return inputs["policy_chosen_logps"], inputs["policy_rejected_logps"]
    lp, = rank_by_scores(inputs.get("scores"), jax.lax.stop_gradient(inputs["policy_logps"]))
    return lp[:, 0], lp[:, -1]


@dataclasses.dataclass(frozen=True)
class BaseLossSpec:
    """A registered base loss: ``fn(inputs, **hp) -> (PreferenceTerms, extra metrics)``, its
    hyper-parameters, the inputs it ``requires`` (kinds of :data:`REQUIREMENTS`: ``"reference"``,
    ``"kl_completions"``, ``"lists"``) and whether it reduces over the batch with collectives
    (takes ``axis_name``)."""

    fn: Callable[..., tuple[PreferenceTerms, dict]]
    hparams: tuple[HParam, ...] = ()
    requires: frozenset[str] = frozenset({"reference"})
    collectives: bool = False


_BETA = HParam("beta", 0.1, ("float",), POSITIVE)


def _smoothing(default: float) -> HParam:
    return HParam("label_smoothing", default, ("float",), NONNEGATIVE)


BASE_LOSSES: dict[str, BaseLossSpec] = {
    "dpo": BaseLossSpec(_dpo_like("sigmoid"), (_BETA, _smoothing(0.0))),
    "cdpo": BaseLossSpec(_dpo_like("sigmoid", 0.1), (_BETA, _smoothing(0.1))),
    "robust": BaseLossSpec(_dpo_like("robust", 0.1), (_BETA, _smoothing(0.1))),
    "ipo": BaseLossSpec(_ipo, (_BETA, HParam("length_normalize", True, ("bool",)))),
    "hinge": BaseLossSpec(_dpo_like("hinge"), (_BETA, _smoothing(0.0))),
    # β / γ / γ/β unset (None): the preset's (SIMPO_PRESETS; default mistral_base: β 2.0, γ 1.6)
    "simpo": BaseLossSpec(_simpo, (
        HParam("preset", SIMPO_DEFAULT_PRESET, ("str",)),
        HParam("beta", None, ("None", "float"), POSITIVE),
        HParam("gamma", None, ("None", "float")),
        HParam("gamma_beta_ratio", None, ("None", "float")),
        _smoothing(0.0),
    ), requires=frozenset()),
    "kto": BaseLossSpec(_kto, (
        _BETA,
        HParam("desirable_weight", 1.0, ("float",), NONNEGATIVE),
        HParam("undesirable_weight", 1.0, ("float",), NONNEGATIVE),
    ), requires=frozenset({"reference", "kl_completions"}), collectives=True),
    "pl": BaseLossSpec(_pl, (_BETA, HParam("reduction", "mean", ("str",))),
                       requires=frozenset({"reference", "lists"})),
    "rrhf": BaseLossSpec(_rrhf, (
        HParam("sft_weight", 1.0, ("float",)),
        HParam("sft_candidate", "best", ("int", "str")),
        HParam("sft_length", None, ("None", "int")),
    ), requires=frozenset({"lists"})),
    "lire": BaseLossSpec(_lire, (HParam("temperature", 2.0, ("float",), POSITIVE),), requires=frozenset({"lists"})),
}

#: allowed values of string hyper-parameters, ``(kind, name, key) -> choices`` (checked by make_objective)
CHOICES: dict[tuple[str, str, str], tuple[str, ...]] = {
    **{("weighting", rule, key): v for (rule, key), v in DORA_CHOICES.items()},
    ("base", "simpo", "preset"): tuple(SIMPO_PRESETS),
}

_AXIS_NAME = HParam("axis_name", None, ("None", "str"))  # accepted where a spec reduces with collectives
_KINDS = {"base": ("base loss", "base_kwargs"), "weighting": ("weighting", "weighting_kwargs"),
          "penalty": ("penalty", "penalty_kwargs")}


def hparam_specs(kind: str, name: str) -> dict[str, HParam]:
    """The hyper-parameters ``{name: HParam}`` that ``kind`` (``"base"``, ``"weighting"`` or
    ``"penalty"``) ``name`` accepts (``axis_name`` too where it reduces with collectives)."""
    if kind == "base":
        spec = BASE_LOSSES[name]
        hps, collectives = spec.hparams, spec.collectives
    elif kind == "weighting":
        rule = WEIGHTING_RULES[name]
        hps, collectives = rule.hparams, rule.collectives
    elif kind == "penalty":
        hps, collectives = PENALTY_HPARAMS[name], False
    else:
        raise ValueError(f"unknown kind {kind!r}; choose one of {sorted(_KINDS)}")
    return {h.name: h for h in (*hps, *((_AXIS_NAME,) if collectives else ()))}


def check_hparams(kind: str, name: str, kwargs: dict, *, names: bool = True, values: bool = True) -> None:
    """Validate ``kwargs`` for the registered ``kind`` ``name`` against its :class:`HParam` specs:
    unknown names raise ``ValueError`` (``names``); a value of the wrong type, non-finite or
    out of range raises :class:`HParamError` (``values``; its ``group``/``key``/``problem``
    let the config loader name the config key)."""
    label, group = _KINDS[kind]
    specs = hparam_specs(kind, name)
    if names:
        bad = sorted(set(kwargs) - set(specs))
        if bad:
            raise ValueError(f"{label} {name!r} got unknown hyper-parameter(s) {bad}; allowed: {list(specs)}")
    if values:
        for k, v in kwargs.items():
            problem = specs[k].problem(v) if k in specs else None
            if problem is not None:
                raise HParamError(f"{label} {name!r}", group, k, problem)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity, so jax.jit can cache it
class Objective:
    """A jittable objective. Call it as ``loss, metrics = objective(inputs, val_inputs=None)``."""

    base: str
    weighting: str
    base_kwargs: dict
    weighting_kwargs: dict
    penalty: str | None = None
    penalty_kwargs: dict = dataclasses.field(default_factory=dict)

    @property
    def requires(self) -> frozenset[str]:
        """The inputs this objective needs, as kinds of :data:`REQUIREMENTS`: ``"reference"``
        (reference log-probs of every sequence group), ``"kl_completions"`` (KTO's mismatched
        ``kl_*`` completions), ``"wpo_terms"`` (WPO's per-sequence log-weight terms),
        ``"val_batch"`` (a deployment/validation batch whose features the rule reads),
        ``"source"`` (DoRA's per-response classifier outputs ``source_prob``/``source_share``),
        ``"lists"`` (a listwise base: accepts the ``cand_*`` ``[B, K, T]`` layout)."""
        return BASE_LOSSES[self.base].requires | WEIGHTING_RULES[self.weighting].requires







    def terms(self, inputs: dict) -> tuple[PreferenceTerms, dict]:
        return BASE_LOSSES[self.base].fn(inputs, **self.base_kwargs)

    def __call__(self, inputs: dict, val_inputs: dict | None = None) -> tuple[jax.Array, dict[str, Any]]:
        terms, extra = self.terms(inputs)
        rule = WEIGHTING_RULES[self.weighting]
        val_terms = self.terms(val_inputs)[0] if ("val_batch" in rule.requires and val_inputs is not None) else None
        if "val_batch" in rule.requires and val_terms is None:
            raise ValueError(f"weighting {self.weighting!r} needs a validation batch (val_inputs)")
        feats = _features(terms, rule.features)
        val_feats = _features(val_terms, rule.features) if val_terms is not None else None
        data_w = jax.lax.stop_gradient(inputs["weight"].astype(jnp.float32)) if "weight" in inputs else None
        # the rule's objective, and its effective per-example weights n·∂objective/∂ℓ for logging
        loss, w = reduce_losses(rule, terms.losses, features=feats, val_features=val_feats, aux=inputs,
                                data_weight=data_w, **self.weighting_kwargs)
        metrics = {"loss": loss, **pair_metrics(terms, *_pair_logps(inputs))}
        metrics.update(extra)
        metrics.update(weight_stats(w))
        return loss, metrics


def _features(terms: PreferenceTerms, kind: str) -> jax.Array:
    if kind == "rewards":  # label-ordered implicit-reward pair [B, 2]
        return jax.lax.stop_gradient(jnp.stack([terms.chosen_rewards, terms.rejected_rewards], axis=-1))
    return jax.lax.stop_gradient(terms.losses)


def make_objective(
    base: str = "dpo",
    weighting: str = "uniform",
    penalty: str | None = None,
    *,
    base_kwargs: dict | None = None,
    weighting_kwargs: dict | None = None,
    penalty_kwargs: dict | None = None,
) -> Objective:
    """Build ``objective = reduce_weighting(ℓ_base)``. Unknown names or hyper-parameters raise
    ``ValueError``; hyper-parameter values of the wrong type or out of range raise
    :class:`~alignshift.losses.hparams.HParamError` (a ``ValueError``; see :func:`check_hparams`)."""
    if base not in BASE_LOSSES:
        raise ValueError(f"unknown base loss {base!r}; choose one of {sorted(BASE_LOSSES)}")
    if weighting not in WEIGHTING_RULES:
        raise ValueError(f"unknown weighting {weighting!r}; choose one of {sorted(WEIGHTING_RULES)}")
    if penalty is not None and penalty not in PENALTIES:
        raise ValueError(f"unknown penalty {penalty!r}; choose one of {sorted(PENALTIES)}")
    base_kwargs = dict(base_kwargs or {})
    weighting_kwargs = dict(weighting_kwargs or {})
    penalty_kwargs = dict(penalty_kwargs or {})
    groups = [("base", base, base_kwargs), ("weighting", weighting, weighting_kwargs)]
    if penalty is not None:
        groups.append(("penalty", penalty, penalty_kwargs))
    moved = sorted({"gradient", "fd_eps", "pairs"} & set(penalty_kwargs))
    if penalty is not None and moved:
        raise ValueError(f"penalty_kwargs {moved}: how the penalty's gradient is taken is a training setting, "
                         "not a hyper-parameter: set it as the method's penalty_gradient {mode, fd_eps, pairs} "
                         "(alignshift.losses.penalties.PenaltyGradient; make_preference_step(..., "
                         "penalty_gradient=...))")
    for kind, name, kwargs in groups:  # unknown names first
        check_hparams(kind, name, kwargs, values=False)
    if penalty is not None:
        if penalty_kwargs.get("penalty", "squared_mean") not in PENALTY_KINDS:
            raise ValueError(f"penalty {penalty!r}: penalty_kwargs penalty= must be one of {PENALTY_KINDS}")
    elif penalty_kwargs:
        raise ValueError(f"penalty_kwargs {sorted(penalty_kwargs)} given without a penalty")
    for kind, name, kwargs in groups:  # then each value's type and range (HParamError)
        check_hparams(kind, name, kwargs, names=False)
        for key, value in kwargs.items():  # and a string hyper-parameter's allowed values
            choices = CHOICES.get((kind, name, key))
            if choices is not None and isinstance(value, str) and value not in choices:
                label, group = _KINDS[kind]
                raise HParamError(f"{label} {name!r}", group, key, f"must be one of {list(choices)}; got {value!r}")
    return Objective(base, weighting, base_kwargs, weighting_kwargs, penalty, penalty_kwargs)
