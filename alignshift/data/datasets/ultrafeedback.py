"""UltraFeedback: binarized pairs (``HuggingFaceH4/ultrafeedback_binarized``) and the
multi-candidate original (``openbmb/UltraFeedback``).

Binarized schema: ``prompt``, ``prompt_id``, ``chosen`` and ``rejected`` (each a list of
``{"role", "content"}`` messages: the user prompt then the assistant response),
``messages``, ``score_chosen``, ``score_rejected``; splits ``train_prefs``/``test_prefs``
(pairs), ``train_sft``/``test_sft``, ``train_gen``/``test_gen``. Mapping: prompt = the
last user turn (earlier turns go to ``meta["prompt_messages"]``), chosen/rejected = the
final assistant turns; ``meta`` keeps the scores and ``prompt_id``.

Original schema: ``source``, ``instruction``, ``models``, ``completions`` (a list of
``{"model", "response", "overall_score", "fine-grained_score", "annotations": {aspect:
{"Rating": "1".."5" or "N/A", "Rationale": ...}}, "critique", ...}``), plus
``correct_answers``/``incorrect_answers``. Mapping: one
:class:`~alignshift.data.datasets.base.CandidateExample` per instruction with score lists
``overall`` (``overall_score``), ``fine_grained`` (``fine-grained_score``) and one per
annotated aspect (``instruction_following``, ``honesty``, ``truthfulness``,
``helpfulness``; ``N/A`` -> NaN). :func:`ultrafeedback_pairs` picks best vs worst by any
weighted mix of these (the H4 binarisation picks the best ``overall_score`` against a
random other completion instead; ``best_worst`` is the FLR/DoRA-style choice).
"""

from __future__ import annotations

import math
from typing import Mapping

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import CandidateExample, best_worst_pairs, load_rows, messages_or_text, require, require_text

__all__ = ["BINARIZED_HUB_NAME", "HUB_NAME", "ASPECTS", "load_ultrafeedback_binarized",
           "load_ultrafeedback_candidates", "ultrafeedback_pairs"]

BINARIZED_HUB_NAME = "HuggingFaceH4/ultrafeedback_binarized"
HUB_NAME = "openbmb/UltraFeedback"
ASPECTS = ("instruction_following", "honesty", "truthfulness", "helpfulness")
_BINARIZED, _ORIGINAL = "ultrafeedback_binarized", "ultrafeedback"


def _split_chat(msgs: list[dict], i: int, field: str, name: str) -> tuple[list[dict], str]:
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{name} row {i}: field {field!r} must end with an assistant message")
    if not msgs[-1]["content"].strip():
        raise DataError(f"{name} row {i}: field {field!r} has an empty assistant response")
    return msgs[:-1], msgs[-1]["content"]


def load_ultrafeedback_binarized(source: str = BINARIZED_HUB_NAME, split: str = "train_prefs", *,
                                 max_rows: int | None = None, skip_bad_rows: bool = False,
                                 report: SkippedRows | None = None) -> list[PreferenceExample]:
    """Pairs of ``split`` (module docstring); with ``skip_bad_rows`` malformed rows are dropped
    and counted in ``report``."""
    rows = load_rows(source, split, max_rows=max_rows, dataset=_BINARIZED)
    return convert_rows(rows, _binarized_row, source=f"{_BINARIZED}/{split}", skip_bad_rows=skip_bad_rows,
                        report=report)


def _binarized_row(r, i: int) -> PreferenceExample:
    name = _BINARIZED
    ctx_c, chosen = _split_chat(messages_or_text(require(r, "chosen", i, name), i, "chosen", name), i, "chosen", name)
    ctx_r, rejected = _split_chat(messages_or_text(require(r, "rejected", i, name), i, "rejected", name), i,
                                  "rejected", name)
    if ctx_c != ctx_r:
        raise DataError(f"{name} row {i}: field 'rejected' has a different conversation before the response "
                        "than field 'chosen'")
    prompt = r.get("prompt") if isinstance(r.get("prompt"), str) and r.get("prompt").strip() else None
    if prompt is None:
        users = [m["content"] for m in ctx_c if m["role"] == "user"]
        if not users:
            raise DataError(f"{name} row {i}: field 'prompt' is missing and 'chosen' has no user turn")
        prompt = users[-1]
    if chosen.strip() == rejected.strip():
        raise DataError(f"{name} row {i}: field 'rejected' is identical to field 'chosen'")
    meta = {"source": name, "row": i, "prompt_id": r.get("prompt_id"),
            "score_chosen": r.get("score_chosen"), "score_rejected": r.get("score_rejected")}
    if len(ctx_c) > 1:
        meta["prompt_messages"] = ctx_c
    return PreferenceExample(prompt, chosen, rejected, meta)


def _rating(v) -> float:
    if v is None:
        return math.nan
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return math.nan  # "N/A"
    return math.nan


def load_ultrafeedback_candidates(source: str = HUB_NAME, split: str = "train", *,
                                  max_rows: int | None = None, min_candidates: int = 2, skip_bad_rows: bool = False,
                                  report: SkippedRows | None = None) -> list[CandidateExample]:
    """One candidate set per instruction with at least ``min_candidates`` non-empty completions
    (module docstring); with ``skip_bad_rows`` malformed rows are dropped and counted in ``report``."""
    rows = load_rows(source, split, max_rows=max_rows, dataset=_ORIGINAL)
    out = convert_rows(rows, lambda r, i: _candidates_row(r, i, min_candidates), source=f"{_ORIGINAL}/{split}",
                       skip_bad_rows=skip_bad_rows, report=report)
    return [c for c in out if c is not None]


def _candidates_row(r, i: int, min_candidates: int) -> CandidateExample | None:
    name = _ORIGINAL
    prompt = require_text(r, "instruction", i, name)
    comps = require(r, "completions", i, name)
    if not isinstance(comps, list):
        raise DataError(f"{name} row {i}: field 'completions' must be a list")
    cands, models = [], []
    scores: dict[str, list] = {"overall": [], "fine_grained": [], **{a: [] for a in ASPECTS}}
    for j, c in enumerate(comps):
        if not isinstance(c, Mapping) or not isinstance(c.get("response"), str):
            raise DataError(f"{name} row {i}: field 'completions' item {j} lacks a str 'response'")
        if not c["response"].strip():
            continue
        cands.append(c["response"])
        models.append(c.get("model"))
        scores["overall"].append(_rating(c.get("overall_score")))
        scores["fine_grained"].append(_rating(c.get("fine-grained_score")))
        ann = c.get("annotations") or {}
        for a in ASPECTS:
            v = ann.get(a)
            if isinstance(v, list):  # some aspects hold a list of raters' annotations
                v = v[0] if v else None
            scores[a].append(_rating(v.get("Rating") if isinstance(v, Mapping) else v))
    if len(cands) < min_candidates:
        return None
    return CandidateExample(prompt, cands, scores, {"source": name, "row": i, "dataset_source": r.get("source"),
                                                    "models": models})


def ultrafeedback_pairs(candidates: list[CandidateExample], weights: Mapping[str, float] | None = None, *,
                        zscore: bool = False, min_gap: float = 0.0) -> list[PreferenceExample]:
    """Best vs worst completion by ``weights`` over the score lists (default: ``overall``)."""
    return best_worst_pairs(candidates, weights or {"overall": 1.0}, zscore=zscore, min_gap=min_gap)
