"""Penalty terms in the train step, looked up by the objective's ``penalty`` name (``None``: no
penalty), so the step itself never names a method.

Each entry gives the objective's inputs together with the penalty's value
(``terms(graphdef, rest, params, batch, objective, logits_fn) -> (inputs, penalty, pair_penalties)``),
and, optionally, a first-order gradient to use instead of differentiating those terms
(``grads(graphdef, rest, params, batch, objective, step, gradient) -> (loss, metrics, grads)``),
used when the training setting :class:`~alignshift.losses.penalties.PenaltyGradient` asks for a
first-order mode.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from alignshift.forward import is_list_batch, is_packed, policy_inputs
from alignshift.losses import Objective
from alignshift.losses.penalties import PenaltyGradient
from alignshift.train.wdpo import add_penalty, wdpo_first_order_grads, wdpo_inputs_and_penalty

__all__ = ["PENALTY_TERMS", "PenaltyTerms", "add_penalty", "penalty_grads", "penalty_terms"]


class PenaltyTerms(NamedTuple):
    terms: Callable
    grads: Callable | None = None  # a first-order gradient (PenaltyGradient modes other than "exact")


def _no_penalty(graphdef, rest, params, batch, objective, logits_fn):
    return policy_inputs(logits_fn, params, batch, objective), None, None


def _wdpo(graphdef, rest, params, batch, objective, logits_fn):
    if is_list_batch(objective, batch):
        raise ValueError(f"penalty {objective.penalty!r} is not supported with listwise batches")
    if is_packed(batch):
        raise ValueError(f"penalty {objective.penalty!r} is not supported with packed or shared-prompt batches "
                         "(it takes per-pair gradients through each pair's own padded rows): set train.packing "
                         "and train.share_prompt to false")
    # through the input embeddings: never chunked or windowed
    return wdpo_inputs_and_penalty(graphdef, rest, params, batch, objective)


PENALTY_TERMS: dict[str | None, PenaltyTerms] = {
    None: PenaltyTerms(_no_penalty),
    "wdpo": PenaltyTerms(_wdpo, wdpo_first_order_grads),
}


def penalty_terms(graphdef, rest, params, batch, objective: Objective, logits_fn):
    """``(inputs, penalty, pair_penalties)`` (the last two None without a penalty)."""
    return PENALTY_TERMS[objective.penalty].terms(graphdef, rest, params, batch, objective, logits_fn)


def penalty_grads(objective: Objective, gradient: PenaltyGradient | None = None, *,
                  with_outputs: bool = False) -> Callable | None:
    """``grads(graphdef, rest, params, batch, step) -> (loss, metrics, grads)`` for a first-order
    ``gradient`` mode, or None (the step differentiates the loss: ``mode="exact"``). With
    ``with_outputs`` it also returns the batch's per-example outputs (for gradient accumulation,
    :mod:`alignshift.train.accumulate`)."""
    gradient = gradient or PenaltyGradient()
    if not gradient.first_order:
        return None
    entry = PENALTY_TERMS[objective.penalty]
    if entry.grads is None:
        raise ValueError(f"penalty gradient mode {gradient.mode!r} needs a penalty with a first-order gradient "
                         f"({sorted(k for k, v in PENALTY_TERMS.items() if v.grads)}); the objective has penalty "
                         f"{objective.penalty!r}")
    return lambda graphdef, rest, params, batch, step: entry.grads(graphdef, rest, params, batch, objective, step,
                                                                   gradient, with_outputs=with_outputs)
