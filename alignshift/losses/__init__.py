"""Pure, jittable loss functions: no I/O, no model code."""

from alignshift.losses.hparams import HParam, HParamError
from alignshift.losses.logps import mean_logps, sequence_logps, token_logps
from alignshift.losses.objective import BASE_LOSSES, REQUIREMENTS, Objective, check_hparams, make_objective
from alignshift.losses.preference import (
    DPO_LOSS_TYPES,
    PreferenceTerms,
    dpo_loss,
    dpo_terms,
    kto_loss,
    kto_terms,
    simpo_loss,
    simpo_terms,
)
from alignshift.losses.reduction import WeightingRule, normalize_weights, reduce_losses, weight_stats
from alignshift.losses.weighting import WEIGHTING_RULES, uniform_weights

__all__ = [
    "BASE_LOSSES",
    "DPO_LOSS_TYPES",
    "HParam",
    "HParamError",
    "Objective",
    "PreferenceTerms",
    "REQUIREMENTS",
    "WEIGHTING_RULES",
    "WeightingRule",
    "check_hparams",
    "dpo_loss",
    "dpo_terms",
    "kto_loss",
    "kto_terms",
    "make_objective",
    "mean_logps",
    "normalize_weights",
    "reduce_losses",
    "sequence_logps",
    "simpo_loss",
    "simpo_terms",
    "token_logps",
    "uniform_weights",
    "weight_stats",
]
