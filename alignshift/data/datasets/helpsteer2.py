"""HelpSteer2 (``nvidia/HelpSteer2``) and WDPO/KLDPO's attribute-mixture preferences.

Published schema: one row per (prompt, response): ``prompt``, ``response``,
``helpfulness``, ``correctness``, ``coherence``, ``complexity``, ``verbosity`` (ints 0-4).
Splits ``train`` (20,324 rows) and ``validation`` (1,038); responses to the same prompt are
adjacent rows (two per prompt). Multi-turn prompts are flattened in ``prompt`` with
``<extra_id_1>User`` / ``<extra_id_1>Assistant`` markers; we keep the text as is.

:func:`load_helpsteer2_candidates` groups rows by prompt into
:class:`~alignshift.data.datasets.base.CandidateExample` s with one score list per attribute.
It also reads *generated* data in a per-prompt layout -- ``{"prompt": str, "responses":
[str, ...], "scores": {objective: [float, ...]}}`` -- which is how the WDPO code stores
policy completions scored by ArmoRM's per-objective heads (e.g. ``helpsteer-helpfulness``,
``ultrafeedback-honesty``).

:func:`helpsteer2_mixture_pairs` is the WDPO construction (``src/generate_preferences.py``,
docs/methods.md §3.3): z-score every objective across the split, mix with convex weights (they must
sum to 1), chosen = argmax and rejected = argmin of the mixed score within the prompt.
"""

from __future__ import annotations

import math
from typing import Mapping

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import CandidateExample, best_worst_pairs, load_rows, require, require_text

__all__ = ["HUB_NAME", "ATTRIBUTES", "load_helpsteer2_candidates", "helpsteer2_mixture_pairs", "WDPO_MIXTURES"]

HUB_NAME = "nvidia/HelpSteer2"
NAME = "helpsteer2"
ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

#: The three 0.5/0.5 training mixtures of the WDPO ArmoRM experiment (docs/methods.md §3.3), named by
#: ArmoRM objective.
WDPO_MIXTURES = {
    "truthfulness_complexity": {"ultrafeedback-truthfulness": 0.5, "helpsteer-complexity": 0.5},
    "helpfulness_coherence": {"ultrafeedback-helpfulness": 0.5, "helpsteer-coherence": 0.5},
    "correctness_helpfulness": {"helpsteer-correctness": 0.5, "helpsteer-helpfulness": 0.5},
}


def _score(v, i, field):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise DataError(f"{NAME} row {i}: field {field!r} must be a number, got {v!r}")
    return float(v)


def load_helpsteer2_candidates(source: str = HUB_NAME, split: str = "train", *,
                               objectives: tuple[str, ...] | None = None,
                               max_rows: int | None = None, skip_bad_rows: bool = False,
                               report: SkippedRows | None = None) -> list[CandidateExample]:
    """Candidates per prompt, in first-appearance order (module docstring for both layouts).
    With ``skip_bad_rows`` malformed rows are dropped and counted in ``report``."""
    rows = load_rows(source, split, max_rows=max_rows, dataset=NAME)
    bad = dict(source=f"{NAME}/{split}", skip_bad_rows=skip_bad_rows, report=report)
    if rows and "responses" in rows[0]:  # per-prompt generated layout
        return convert_rows(rows, lambda r, i: _generated_row(r, i, objectives), **bad)
    objs = objectives or ATTRIBUTES
    groups: dict[str, dict] = {}
    for i, prompt, resp, scores in convert_rows(rows, lambda r, i: _rated_row(r, i, objs), **bad):
        g = groups.setdefault(prompt, {"rows": [], "responses": [], "scores": {o: [] for o in objs}})
        g["rows"].append(i)
        g["responses"].append(resp)
        for o in objs:
            g["scores"][o].append(scores[o])
    return [CandidateExample(prompt, g["responses"], g["scores"], {"source": NAME, "row": g["rows"][0],
                                                                   "rows": g["rows"]})
            for prompt, g in groups.items()]


def _generated_row(r, i: int, objectives) -> CandidateExample:
    prompt = require_text(r, "prompt", i, NAME)
    resp = require(r, "responses", i, NAME)
    if not isinstance(resp, list) or len(resp) < 2 or not all(isinstance(x, str) for x in resp):
        raise DataError(f"{NAME} row {i}: field 'responses' must be a list of >= 2 strings")
    scores = require(r, "scores", i, NAME)
    if not isinstance(scores, Mapping):
        raise DataError(f"{NAME} row {i}: field 'scores' must map objective -> list of scores")
    sc = {}
    for o in objectives or tuple(scores):
        if o not in scores:
            raise DataError(f"{NAME} row {i}: field 'scores' lacks objective {o!r}")
        vals = scores[o]
        if not isinstance(vals, list) or len(vals) != len(resp):
            raise DataError(f"{NAME} row {i}: field 'scores.{o}' must list one score per response")
        sc[o] = [math.nan if v is None else _score(v, i, f"scores.{o}") for v in vals]
    return CandidateExample(prompt, list(resp), sc, {"source": NAME, "row": i})


def _rated_row(r, i: int, objs) -> tuple[int, str, str, dict]:
    """One (prompt, response) row of the published layout: ``(row, prompt, response, scores)``."""
    prompt = require_text(r, "prompt", i, NAME)
    resp = require_text(r, "response", i, NAME)
    return i, prompt, resp, {o: _score(require(r, o, i, NAME), i, o) for o in objs}


def helpsteer2_mixture_pairs(candidates: list[CandidateExample], weights: Mapping[str, float], *,
                             zscore: bool = True, min_gap: float = 0.0) -> list[PreferenceExample]:
    """WDPO pairs: convex mixture (weights sum to 1) of z-scored objectives, best vs worst."""
    total = sum(float(w) for w in weights.values())
    if any(float(w) < 0 for w in weights.values()) or abs(total - 1.0) > 1e-6:
        raise ValueError(f"mixture weights must be >= 0 and sum to 1 (WDPO's convex mixture); got {dict(weights)}")
    pairs = best_worst_pairs(candidates, weights, zscore=zscore, min_gap=min_gap)
    return [PreferenceExample(p.prompt, p.chosen, p.rejected, {**p.meta, "mixture": dict(weights)}) for p in pairs]
