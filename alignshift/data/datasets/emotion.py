"""Emotion (``dair-ai/emotion``; Saravia et al. 2018) for the WDPO/KLDPO reward-mixture experiment.

Published schema: ``text`` (an English tweet) and ``label`` (class id: 0 sadness, 1 joy,
2 love, 3 anger, 4 fear, 5 surprise); splits ``train`` (16k), ``validation`` (2k),
``test`` (2k) in the ``split`` config.

It is a *classification* set, not preference data: the experiment (docs/methods.md §3.3, §8) trains an
emotion classifier on it (the reward model), uses tweet prefixes as prompts for a GPT-2
policy, and labels pairs of sampled continuations by a mixture of two emotion rewards
(``fear`` at training with α₀ = 0.1, moving towards ``anger`` at evaluation; convex or
geometric mixing, :func:`alignshift.data.mix_reward`). This adapter provides the rows
(:func:`load_emotion`), the prompts (:func:`emotion_prompts`) and the pair labelling
(:func:`emotion_mixture_pairs`) given classifier probabilities for each continuation.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from alignshift.data.preference_shift import mix_reward
from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import load_rows, require, require_text

__all__ = ["HUB_NAME", "LABELS", "load_emotion", "emotion_prompts", "emotion_mixture_pairs"]

HUB_NAME = "dair-ai/emotion"
NAME = "emotion"
LABELS = ("sadness", "joy", "love", "anger", "fear", "surprise")


def load_emotion(source: str = HUB_NAME, split: str = "train", *, name: str | None = None,
                 max_rows: int | None = None, skip_bad_rows: bool = False,
                 report: SkippedRows | None = None) -> list[dict]:
    """``[{"text", "label" (int), "label_name", "row"}]``; with ``skip_bad_rows`` malformed rows
    are dropped and counted in ``report``."""
    rows = load_rows(source, split, name=name, max_rows=max_rows, dataset=NAME)
    return convert_rows(rows, _row, source=f"{NAME}/{split}", skip_bad_rows=skip_bad_rows, report=report)


def _row(r, i: int) -> dict:
    text = require_text(r, "text", i, NAME)
    lab = require(r, "label", i, NAME)
    if isinstance(lab, str) and lab in LABELS:
        lab = LABELS.index(lab)
    if isinstance(lab, bool) or not isinstance(lab, (int, np.integer)) or not 0 <= int(lab) < len(LABELS):
        raise DataError(f"{NAME} row {i}: field 'label' must be a class id 0..5 or a label name, got {lab!r}")
    return {"text": text, "label": int(lab), "label_name": LABELS[int(lab)], "row": i}


def emotion_prompts(rows: Sequence[dict], *, n_words: int = 4, min_words: int = 6) -> list[str]:
    """Prompts = the first ``n_words`` words of tweets with at least ``min_words`` words."""
    return [" ".join(r["text"].split()[:n_words]) for r in rows if len(r["text"].split()) >= min_words]


def emotion_mixture_pairs(prompts: Sequence[str], continuations: Sequence[Sequence[str]],
                          probs: np.ndarray, *, alpha: float, kind: str = "convex",
                          reward_a: str = "fear", reward_b: str = "anger") -> list[PreferenceExample]:
    """Label two continuations per prompt by ``mix_reward(p[reward_a], p[reward_b], alpha, kind)``.

    ``probs`` has shape ``[N, 2, 6]``: the classifier's class probabilities for each of the
    two continuations of prompt ``i``. The continuation with the higher mixed reward is
    chosen; ties are dropped. ``meta`` records both mixed rewards and α.
    """
    probs = np.asarray(probs, np.float64)
    n = len(prompts)
    if probs.shape != (n, 2, len(LABELS)):
        raise ValueError(f"probs must have shape ({n}, 2, {len(LABELS)}), got {probs.shape}")
    ia, ib = LABELS.index(reward_a), LABELS.index(reward_b)
    r = mix_reward(probs[..., ia], probs[..., ib], alpha, kind)
    out = []
    for i in range(n):
        if len(continuations[i]) != 2:
            raise DataError(f"{NAME} prompt {i}: expected 2 continuations, got {len(continuations[i])}")
        if r[i, 0] == r[i, 1] or continuations[i][0].strip() == continuations[i][1].strip():
            continue
        c = int(r[i, 1] > r[i, 0])
        out.append(PreferenceExample(prompts[i], continuations[i][c], continuations[i][1 - c],
                                     {"source": NAME, "row": i, "alpha": float(alpha), "kind": kind,
                                      "reward_chosen": float(r[i, c]), "reward_rejected": float(r[i, 1 - c])}))
    return out
