"""Pure, jittable loss functions: no I/O, no model code."""

from alignshift.losses.logps import mean_logps, sequence_logps, token_logps
from alignshift.losses.objective import BASE_LOSSES, Objective, make_objective
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
from alignshift.losses.weighting import WEIGHTING_RULES, normalize_weights, uniform_weights, weight_stats

__all__ = [
    "BASE_LOSSES",
    "DPO_LOSS_TYPES",
    "Objective",
    "PreferenceTerms",
    "WEIGHTING_RULES",
    "dpo_loss",
    "dpo_terms",
    "kto_loss",
    "kto_terms",
    "make_objective",
    "mean_logps",
    "normalize_weights",
    "sequence_logps",
    "simpo_loss",
    "simpo_terms",
    "token_logps",
    "uniform_weights",
    "weight_stats",
]
