"""Penalty terms in the train step, looked up by the objective's ``penalty`` name (``None``: no
penalty), so the step itself never names a method.

Each entry gives the objective's inputs together with the penalty's value
(``terms(graphdef, rest, params, batch, objective, logits_fn) -> (inputs, penalty, pair_penalties)``),
and, optionally, a first-order gradient to use instead of differentiating those terms
(``grads(graphdef, rest, params, batch, objective, step) -> (loss, metrics, grads)``, when the
objective's penalty settings ask for one).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from alignshift.forward import is_list_batch, policy_inputs
from alignshift.losses import Objective
from alignshift.train.wdpo import add_penalty, first_order, wdpo_first_order_grads, wdpo_inputs_and_penalty

__all__ = ["PENALTY_TERMS", "PenaltyTerms", "add_penalty", "penalty_grads", "penalty_terms"]


class PenaltyTerms(NamedTuple):
    terms: Callable
    grads: Callable | None = None  # first-order gradient, used when ``use_grads(objective)``
    use_grads: Callable[[Objective], bool] = lambda objective: False


def _no_penalty(graphdef, rest, params, batch, objective, logits_fn):
    return policy_inputs(logits_fn, params, batch, objective), None, None


def _wdpo(graphdef, rest, params, batch, objective, logits_fn):
    if is_list_batch(objective, batch):
        raise ValueError(f"penalty {objective.penalty!r} is not supported with listwise batches")
    # through the input embeddings: never chunked or windowed
    return wdpo_inputs_and_penalty(graphdef, rest, params, batch, objective)


PENALTY_TERMS: dict[str | None, PenaltyTerms] = {
    None: PenaltyTerms(_no_penalty),
    "wdpo": PenaltyTerms(_wdpo, wdpo_first_order_grads, first_order),
}


def penalty_terms(graphdef, rest, params, batch, objective: Objective, logits_fn):
    """``(inputs, penalty, pair_penalties)`` (the last two None without a penalty)."""
    return PENALTY_TERMS[objective.penalty].terms(graphdef, rest, params, batch, objective, logits_fn)


def penalty_grads(objective: Objective) -> Callable | None:
    """The objective's first-order gradient function, or None (differentiate the loss)."""
    entry = PENALTY_TERMS[objective.penalty]
    return entry.grads if entry.use_grads(objective) else None
