"""Your own data: pairwise or K-candidate JSONL/parquet files (or hub sets in these layouts).

``preference`` layout (:func:`load_preference_file`), one row per pair:
``{"prompt": str | [messages], "chosen": str | [messages], "rejected": str | [messages],
"meta": {...}?, "weight": float?}``. Message lists are ``[{"role", "content"}]``; for
``chosen``/``rejected`` either the response alone (a string) or the whole conversation
ending in the assistant response. ``weight`` becomes ``meta["weight"]``.

``candidates`` layout (:func:`load_candidates_file`), one row per prompt:
``{"prompt": str, "candidates": [str, ...], "scores": [float, ...] | {objective: [...]},
"probs": [float, ...]?, "source_ids": [int, ...]?, "meta": {...}?}`` -- e.g. DoRA's K
candidates with a reward score each and the target-vs-synthetic classifier probability
(``probs``) and source slot of each candidate; ``probs``/``source_ids`` go to ``meta``.
"""

from __future__ import annotations

from typing import Mapping

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import CandidateExample, load_rows, messages_or_text, require, require_text

__all__ = ["load_preference_file", "load_candidates_file"]


def _response(value, i, field, name) -> tuple[list[dict], str]:
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{name} row {i}: field {field!r} is empty")
        return [], value
    msgs = messages_or_text(value, i, field, name)
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{name} row {i}: field {field!r} must end with a non-empty assistant message")
    return msgs[:-1], msgs[-1]["content"]


def load_preference_file(source: str, split: str = "train", *, max_rows: int | None = None,
                         name: str = "preference", skip_bad_rows: bool = False,
                         report: SkippedRows | None = None) -> list[PreferenceExample]:
    """Pairs in the ``preference`` layout (module docstring); with ``skip_bad_rows`` malformed
    rows (and, in a local JSONL file, lines that are not valid JSON) are dropped and counted in
    ``report``; without it the first one raises :class:`DataError` naming the row and field
    (for a bad JSON line: the file and the line)."""
    rows = load_rows(source, split, max_rows=max_rows, dataset=name, skip_bad_rows=skip_bad_rows, report=report)
    return convert_rows(rows, lambda r, i: _preference_row(r, i, name), source=f"{name}/{split}",
                        skip_bad_rows=skip_bad_rows, report=report)


def _preference_row(r, i: int, name: str) -> PreferenceExample:
    prompt_msgs = messages_or_text(require(r, "prompt", i, name), i, "prompt", name)
    ctx_c, chosen = _response(require(r, "chosen", i, name), i, "chosen", name)
    ctx_r, rejected = _response(require(r, "rejected", i, name), i, "rejected", name)
    if ctx_c and ctx_r and ctx_c != ctx_r:
        raise DataError(f"{name} row {i}: field 'rejected' has a different conversation than field 'chosen'")
    if chosen.strip() == rejected.strip():
        raise DataError(f"{name} row {i}: field 'rejected' is identical to field 'chosen'")
    if prompt_msgs[-1]["role"] != "user" or not prompt_msgs[-1]["content"].strip():
        raise DataError(f"{name} row {i}: field 'prompt' must end with a non-empty user message")
    if not isinstance(r.get("meta") or {}, Mapping):
        raise DataError(f"{name} row {i}: field 'meta' must be a mapping")
    meta = dict(r.get("meta") or {})
    meta.update({"source": meta.get("source", name), "row": i})
    if len(prompt_msgs) > 1:
        meta["prompt_messages"] = prompt_msgs
    if r.get("weight") is not None:
        w = r["weight"]
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise DataError(f"{name} row {i}: field 'weight' must be a number >= 0, got {w!r}")
        meta["weight"] = float(w)
    return PreferenceExample(prompt_msgs[-1]["content"], chosen, rejected, meta)


def load_candidates_file(source: str, split: str = "train", *, max_rows: int | None = None,
                         name: str = "candidates", skip_bad_rows: bool = False,
                         report: SkippedRows | None = None) -> list[CandidateExample]:
    """Candidate sets in the ``candidates`` layout (module docstring); with ``skip_bad_rows``
    malformed rows are dropped and counted in ``report``."""
    rows = load_rows(source, split, max_rows=max_rows, dataset=name, skip_bad_rows=skip_bad_rows, report=report)
    return convert_rows(rows, lambda r, i: _candidates_row(r, i, name), source=f"{name}/{split}",
                        skip_bad_rows=skip_bad_rows, report=report)


def _candidates_row(r, i: int, name: str) -> CandidateExample:
    prompt = require_text(r, "prompt", i, name)
    cands = require(r, "candidates", i, name)
    if not isinstance(cands, list) or len(cands) < 2 or not all(isinstance(c, str) and c.strip() for c in cands):
        raise DataError(f"{name} row {i}: field 'candidates' must be a list of >= 2 non-empty strings")
    scores = require(r, "scores", i, name)
    if isinstance(scores, list):
        scores = {"score": scores}
    if not isinstance(scores, Mapping):
        raise DataError(f"{name} row {i}: field 'scores' must be a list or a mapping objective -> list")
    sc = {}
    for k, v in scores.items():
        if not isinstance(v, list) or len(v) != len(cands) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
            raise DataError(f"{name} row {i}: field 'scores' ({k}) must list one number per candidate")
        sc[k] = [float(x) for x in v]
    if not isinstance(r.get("meta") or {}, Mapping):
        raise DataError(f"{name} row {i}: field 'meta' must be a mapping")
    meta = {**dict(r.get("meta") or {}), "source": name, "row": i}
    for key in ("probs", "source_ids"):
        if r.get(key) is not None:
            v = r[key]
            if not isinstance(v, list) or len(v) != len(cands):
                raise DataError(f"{name} row {i}: field {key!r} must list one value per candidate")
            if key == "probs" and not all(isinstance(x, (int, float)) and 0.0 <= x <= 1.0 for x in v):
                raise DataError(f"{name} row {i}: field 'probs' must hold probabilities in [0, 1]")
            meta[key] = list(v)
    return CandidateExample(prompt, list(cands), sc, meta)
