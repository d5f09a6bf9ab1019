"""Reward-model evaluation on local benchmark files: pairwise accuracy and rating correlation.

    python -m alignshift.rewards.evaluate --model PATH --bench shp.jsonl helpsteer.jsonl \
        [--reward flr|direct] [--dimension understanding] [--mode likelihood|repo] \
        [--aggregate difference|positive|negative] [--layout auto] [--max-examples N] [--out res.json] \
        [--skip-bad-rows]

``--model`` is a Hugging Face folder (``config.json`` + safetensors + tokenizer with a chat
template, loaded by :func:`alignshift.models.hf.load_hf_model` / ``load_hf_tokenizer``).
Nothing is downloaded: every benchmark is a local JSONL file, one example per line, in the
layout of the public release of the benchmarks FLR reports (docs/methods.md §5.4). ``--layout auto``
recognises the layout from the first row's keys:

Pairwise (metric: accuracy = fraction of pairs with ``r(chosen) > r(rejected)``; ties wrong)

==================  ===========================================================================
layout              keys (one JSON object per line)
==================  ===========================================================================
``pairwise``        ``prompt``, ``chosen``, ``rejected`` (generic; the FLR repo's accept/reject)
``shp``             ``history``, ``human_ref_A``, ``human_ref_B``, ``labels`` (1: A preferred)
``hh``              ``chosen``, ``rejected``: full ``\\n\\nHuman: ... \\n\\nAssistant: ...``
                    transcripts (Anthropic HH ``helpful-base`` / ``-online`` /
                    ``-rejection-sampled``); the prompt is the shared history up to the final
                    ``Assistant:`` turn, the responses the final assistant turns
``alpaca_farm``     ``instruction``, ``input``, ``output_1``, ``output_2``, ``preference``
                    (1 or 2; AlpacaFarm human/GPT-4 preference sets)
``beavertails``     ``prompt``, ``response_0``, ``response_1``, ``better_response_id`` (0/1;
                    PKU-SafeRLHF / BeaverTails preference release, "holistic" = helpfulness)
==================  ===========================================================================

Rating (metrics: Pearson and Spearman correlation of reward vs the gold score)

==================  ===========================================================================
``rating``          ``prompt``, ``response``, ``score`` (generic)
``helpsteer``       ``prompt``, ``response``, ``helpfulness`` (NVIDIA HelpSteer, 0..4)
``flask``           ``instruction``, ``response``, ``score`` (FLASK fine-grained eval set)
``mt_bench``        ``question``/``user_prompt``, ``answer``/``response``, ``score`` (MT-Bench
                    single-answer grading; multi-turn questions as one string)
``feedback_bench``  ``orig_instruction``, ``orig_response``, ``orig_score`` (Prometheus
                    Feedback-Bench)
==================  ===========================================================================

Malformed input (a line that is not JSON, a row missing a field, an HH row whose ``chosen``
and ``rejected`` transcripts have different histories) raises a ``DataError`` naming the file,
the line and the field; with ``--skip-bad-rows`` (``load_bench(..., skip_bad_rows=True)``) such
rows are dropped instead, counted, and reported (on stderr and under ``skipped_rows`` in each
file's results). On the command line a data error prints one ``error: ...`` line and exits
with status 2.

An HH row whose final assistant turn (``chosen`` or ``rejected``) is empty is malformed too
(Direct has no token to score; 4 of the first 1,156 ``harmless-base`` test rows are like this).

Metrics are plain NumPy (float64) and checked against SciPy in the tests: Spearman is the
Pearson correlation of average ranks (ties share their mean rank); a constant input gives NaN.
Pairwise accuracy comes with a percentile bootstrap 95% interval over pairs
(:func:`bootstrap_ci`; ``--n-boot`` resamples, ``--seed``).

Real models on a CPU
    * Rows are scored in chunks of ``--chunk`` rows sorted by text length, so that a batch is
      padded to the longest row of its chunk, not of the file (one compilation per chunk).
    * ``--sample N`` evaluates a seeded random subset of N rows (the first N of a permutation
      seeded by ``--seed``, so a larger N keeps them; ``--sample-offset K`` takes the N after
      the first K instead, disjoint from them; the indices among the kept rows are reported);
      ``--max-examples N`` keeps the first N rows.
    * ``--hh-turns``: render an HH transcript prompt as alternating chat turns (``user`` /
      ``assistant`` ...) under the tokenizer's chat template, as the FLR authors' scripts do
      for multi-turn conversations (docs/methods.md §5.3), instead of one user message holding the whole
      ``Human:/Assistant:`` transcript (the default).
    * ``--sweep`` (pairwise files): ONE follow-up pass with all 60 follow-ups scores FLR in both
      modes for every dimension and ``all`` (``--aggregate``), then Direct and a response-length
      baseline (``length``: more tokens wins); each method gets accuracy, bootstrap interval,
      ties, and its paired-bootstrap difference to Direct. ``--dimension``/``--mode``/``--reward``
      are ignored. ``--save-scores PATH`` writes the per-row rewards (``.npz``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

from alignshift.data.schema import DataError, SkippedRows

__all__ = [
    "PAIRWISE_LAYOUTS",
    "RATING_LAYOUTS",
    "pairwise_accuracy",
    "bootstrap_ci",
    "hh_turns",
    "HHTurnsTokenizer",
    "sweep_scores",
    "pearson",
    "spearman",
    "rankdata",
    "detect_layout",
    "load_bench",
    "evaluate_reward",
    "main",
]

PAIRWISE_LAYOUTS = ("pairwise", "shp", "hh", "alpaca_farm", "beavertails")
RATING_LAYOUTS = ("rating", "helpsteer", "flask", "mt_bench", "feedback_bench")

# layout -> keys that identify it (checked in this order; the most specific first)
_SIGNATURES = [
    ("shp", {"history", "human_ref_A", "human_ref_B", "labels"}),
    ("alpaca_farm", {"instruction", "output_1", "output_2", "preference"}),
    ("beavertails", {"prompt", "response_0", "response_1", "better_response_id"}),
    ("pairwise", {"prompt", "chosen", "rejected"}),
    ("hh", {"chosen", "rejected"}),
    ("feedback_bench", {"orig_instruction", "orig_response", "orig_score"}),
    ("helpsteer", {"prompt", "response", "helpfulness"}),
    ("flask", {"instruction", "response", "score"}),
    ("rating", {"prompt", "response", "score"}),
    ("mt_bench", {"score"}),
]


# --------------------------------------------------------------------------- metrics


def pairwise_accuracy(chosen_scores, rejected_scores) -> float:
    """Fraction of pairs whose chosen score is strictly higher (ties count as wrong)."""
    c, r = np.asarray(chosen_scores, np.float64), np.asarray(rejected_scores, np.float64)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"chosen/rejected scores must be 1-D of equal length, got {c.shape} and {r.shape}")
    if c.size == 0:
        raise ValueError("no pairs to evaluate")
    return float(np.mean(c > r))


def _boot_idx(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def bootstrap_ci(values, n_boot: int = 10_000, seed: int = 0, level: float = 0.95, *,
                 baseline=None) -> tuple[float, float]:
    """Percentile bootstrap interval of ``mean(values)`` (e.g. per-pair 0/1 correctness),
    resampling rows with replacement; with ``baseline`` (same length), of the paired difference
    ``mean(values) - mean(baseline)`` (the same resampled rows for both). The resampled rows
    depend only on ``(len(values), n_boot, seed)``, so intervals of methods scored on the same
    rows are paired."""
    v = np.asarray(values, np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"bootstrap_ci needs a non-empty 1-D array, got shape {v.shape}")
    if baseline is not None:
        b = np.asarray(baseline, np.float64)
        if b.shape != v.shape:
            raise ValueError(f"baseline shape {b.shape} != values shape {v.shape}")
        v = v - b
    idx = _boot_idx(len(v), n_boot, seed)
    means = v[idx].mean(1)
    a = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [a, 1.0 - a])
    return float(lo), float(hi)


def pearson(x, y) -> float:
    """Pearson correlation (float64); NaN when either input is constant."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size < 2:
        raise ValueError(f"pearson needs two 1-D arrays of equal length >= 2, got {x.shape} and {y.shape}")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(np.dot(xc, xc)) * float(np.dot(yc, yc)))
    return float(np.dot(xc, yc) / den) if den > 0 else float("nan")


def rankdata(x) -> np.ndarray:
    """1-based ranks, ties get their average rank (SciPy ``rankdata(method="average")``)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    return ranks


def spearman(x, y) -> float:
    """Spearman rank correlation = Pearson of average ranks."""
    return pearson(rankdata(x), rankdata(y))


# --------------------------------------------------------------------------- files


def _hh_split(text: str, row: int, field: str) -> tuple[str, str]:
    marker = "\n\nAssistant:"
    at = text.rfind(marker)
    if at < 0:
        raise ValueError(f"row {row}: field '{field}' has no '\\n\\nAssistant:' turn (HH layout)")
    resp = text[at + len(marker):].strip()
    if not resp:
        raise ValueError(f"row {row}: field '{field}' has an empty final assistant turn (HH layout)")
    return text[:at + len(marker)], resp


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def hh_turns(transcript: str) -> list[dict] | None:
    """An HH transcript prompt (``"\\n\\nHuman: q1\\n\\nAssistant: a1 ... \\n\\nHuman: qn\\n\\nAssistant:"``)
    as chat messages ``[user q1, assistant a1, ..., user qn]`` (contents stripped; the trailing
    empty ``Assistant:`` slot dropped; consecutive turns of one role joined by a blank line).
    ``None`` when the text does not start with a ``Human:`` turn."""
    parts = _HH_TURN.split(transcript)
    if parts[0].strip() or len(parts) < 3 or parts[1] != "Human":
        return None
    msgs: list[dict] = []
    for who, text in zip(parts[1::2], parts[2::2]):
        role = "user" if who == "Human" else "assistant"
        text = text.strip()
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] = (msgs[-1]["content"] + "\n\n" + text).strip()
        else:
            msgs.append({"role": role, "content": text})
    if msgs[-1]["role"] == "assistant" and not msgs[-1]["content"]:
        msgs.pop()
    return msgs


class HHTurnsTokenizer:
    """A Hugging Face tokenizer whose ``apply_chat_template`` expands a user message holding an
    HH transcript into its chat turns (:func:`hh_turns`); everything else is delegated. With it
    FLR renders ``q1 / a1 / ... / qn / response / follow-up`` as real turns (``--hh-turns``)."""

    def __init__(self, tokenizer):
        self._tok = tokenizer

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, *args, **kwargs):
        return self._tok(*args, **kwargs)

    def apply_chat_template(self, messages, *args, **kwargs):
        out = []
        for m in messages:
            turns = hh_turns(m["content"]) if m["role"] == "user" else None
            out.extend(turns if turns else [m])
        return self._tok.apply_chat_template(out, *args, **kwargs)


def _alpaca_prompt(r: dict) -> str:
    inp = (r.get("input") or "").strip()
    return r["instruction"] + ("\n\n" + inp if inp else "")


def detect_layout(row: dict) -> str:
    keys = set(row)
    for name, sig in _SIGNATURES:
        if sig <= keys:
            if name == "mt_bench" and not ({"question", "user_prompt", "turns"} & keys):
                continue
            return name
    raise ValueError(f"cannot recognise the benchmark layout from keys {sorted(keys)}; pass --layout "
                     f"(one of {PAIRWISE_LAYOUTS + RATING_LAYOUTS})")


def _get(r: dict, i: int, *names):
    for n in names:
        if n in r and r[n] is not None:
            return r[n]
    raise ValueError(f"row {i}: missing field {names[0]!r}" + (f" (or {list(names[1:])})" if len(names) > 1 else ""))


def _text(v, i: int, name: str) -> str:
    if isinstance(v, list):  # e.g. MT-Bench multi-turn questions
        v = "\n".join(str(t) for t in v)
    if not isinstance(v, str):
        raise ValueError(f"row {i}: field {name!r} must be a string, got {type(v).__name__}")
    return v


def _number(v, i: int, name: str) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"row {i}: field {name!r} must be a number, got {v!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"row {i}: field {name!r} is not finite ({v!r})")
    return x


def _parse_row(layout: str, r: dict, i: int):
    if layout == "pairwise":
        return (_text(_get(r, i, "prompt"), i, "prompt"), _text(_get(r, i, "chosen"), i, "chosen"),
                _text(_get(r, i, "rejected"), i, "rejected"))
    if layout == "shp":
        a, b = _text(_get(r, i, "human_ref_A"), i, "human_ref_A"), _text(_get(r, i, "human_ref_B"), i, "human_ref_B")
        lab = _get(r, i, "labels")
        if lab not in (0, 1):
            raise ValueError(f"row {i}: field 'labels' must be 0 or 1, got {lab!r}")
        return (_text(_get(r, i, "history"), i, "history"),) + ((a, b) if lab == 1 else (b, a))
    if layout == "hh":
        pc, c = _hh_split(_text(_get(r, i, "chosen"), i, "chosen"), i, "chosen")
        pr, rj = _hh_split(_text(_get(r, i, "rejected"), i, "rejected"), i, "rejected")
        if pc != pr:
            raise ValueError(f"row {i}: 'chosen' and 'rejected' transcripts have different histories")
        return pc, c, rj
    if layout == "alpaca_farm":
        o1, o2 = _text(_get(r, i, "output_1"), i, "output_1"), _text(_get(r, i, "output_2"), i, "output_2")
        pref = _get(r, i, "preference")
        if pref not in (1, 2):
            raise ValueError(f"row {i}: field 'preference' must be 1 or 2, got {pref!r}")
        return (_alpaca_prompt(r),) + ((o1, o2) if pref == 1 else (o2, o1))
    if layout == "beavertails":
        r0, r1 = _text(_get(r, i, "response_0"), i, "response_0"), _text(_get(r, i, "response_1"), i, "response_1")
        b = _get(r, i, "better_response_id")
        if b not in (0, 1):
            raise ValueError(f"row {i}: field 'better_response_id' must be 0 or 1, got {b!r}")
        return (_text(_get(r, i, "prompt"), i, "prompt"),) + ((r0, r1) if b == 0 else (r1, r0))
    if layout == "rating":
        return (_text(_get(r, i, "prompt"), i, "prompt"), _text(_get(r, i, "response"), i, "response"),
                _number(_get(r, i, "score"), i, "score"))
    if layout == "helpsteer":
        return (_text(_get(r, i, "prompt"), i, "prompt"), _text(_get(r, i, "response"), i, "response"),
                _number(_get(r, i, "helpfulness"), i, "helpfulness"))
    if layout == "flask":
        return (_text(_get(r, i, "instruction", "question"), i, "instruction"),
                _text(_get(r, i, "response", "answer"), i, "response"), _number(_get(r, i, "score"), i, "score"))
    if layout == "mt_bench":
        return (_text(_get(r, i, "question", "user_prompt", "turns"), i, "question"),
                _text(_get(r, i, "answer", "response"), i, "answer"), _number(_get(r, i, "score"), i, "score"))
    if layout == "feedback_bench":
        return (_text(_get(r, i, "orig_instruction"), i, "orig_instruction"),
                _text(_get(r, i, "orig_response"), i, "orig_response"),
                _number(_get(r, i, "orig_score"), i, "orig_score"))
    raise ValueError(f"unknown layout {layout!r}; valid: {PAIRWISE_LAYOUTS + RATING_LAYOUTS}")


def load_bench(path: str, layout: str = "auto", max_examples: int | None = None, *, skip_bad_rows: bool = False,
               report: SkippedRows | None = None) -> tuple[str, str, list[tuple]]:
    """Read a JSONL benchmark -> ``(kind, layout, rows)``: kind ``"pairwise"`` with rows
    ``(prompt, chosen, rejected)`` or ``"rating"`` with rows ``(prompt, response, score)``.

    A bad line (not UTF-8, not JSON, not an object) or a malformed row raises
    :class:`~alignshift.data.DataError` (a ``ValueError``) naming the file and the line; with
    ``skip_bad_rows`` it is dropped and counted in ``report`` instead. ``max_examples`` counts
    the rows kept. The layout (``"auto"``) is recognised from the first JSON object."""
    if layout != "auto" and layout not in PAIRWISE_LAYOUTS + RATING_LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; valid: {PAIRWISE_LAYOUTS + RATING_LAYOUTS}")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    rows: list[tuple] = []
    i = -1  # index among the non-blank lines (the "row" of the messages)

    def bad(err: DataError) -> None:
        if not skip_bad_rows:
            raise err
        if report is not None:
            report.add(path, err)

    with open(path, "rb") as f:
        for ln, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                i += 1
                bad(DataError(f"{path}: line {ln} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at column "
                              f"{e.start + 1})"))
                continue
            if not line.strip():
                continue
            i += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                bad(DataError(f"{path}: line {ln} is not valid JSON ({e.msg} at column {e.colno})"))
                continue
            if not isinstance(obj, dict):
                bad(DataError(f"{path}: line {ln} is not a JSON object (got {type(obj).__name__})"))
                continue
            if layout == "auto":
                try:
                    layout = detect_layout(obj)
                except ValueError as e:
                    raise DataError(f"{path}: line {ln}: {e}") from None
            try:
                rows.append(_parse_row(layout, obj, i))
            except ValueError as e:
                bad(DataError(f"{path}: line {ln}: {e}"))
                continue
            except (KeyError, TypeError, AttributeError) as e:  # a field of the wrong shape
                bad(DataError(f"{path}: line {ln}: row {i}: malformed {layout} row ({type(e).__name__}: {e})"))
                continue
            if max_examples is not None and len(rows) >= max_examples:
                break
    if not rows:
        raise DataError(f"{path}: no examples" + (" left after skipping bad rows" if i >= 0 else ""))
    return ("pairwise" if layout in PAIRWISE_LAYOUTS else "rating"), layout, rows


def _pair_metrics(c: np.ndarray, j: np.ndarray, n_boot: int, seed: int, baseline: dict | None = None) -> dict:
    acc = pairwise_accuracy(c, j)
    ok = (c > j).astype(np.float64)
    out = {"accuracy": acc, "accuracy_ci95": list(bootstrap_ci(ok, n_boot, seed)), "ties": float(np.mean(c == j))}
    if baseline is not None:
        base = (baseline["chosen"] > baseline["rejected"]).astype(np.float64)
        out["minus_direct"] = float(acc - base.mean())
        out["minus_direct_ci95"] = list(bootstrap_ci(ok, n_boot, seed, baseline=base))
    return out


def evaluate_reward(reward_fn: Callable[[Sequence[str], Sequence[str]], np.ndarray], kind: str,
                    rows: list[tuple], *, n_boot: int = 10_000, seed: int = 0) -> dict:
    """Score the rows with ``reward_fn(prompts, responses) -> [N]`` and compute the metrics
    (pairwise: accuracy, its bootstrap 95% interval ``accuracy_ci95``, and the tie rate)."""
    if kind == "pairwise":
        prompts = [r[0] for r in rows]
        s = np.asarray(reward_fn(prompts + prompts, [r[1] for r in rows] + [r[2] for r in rows]), np.float64)
        c, j = s[: len(rows)], s[len(rows):]
        return {"kind": kind, "n": len(rows), **_pair_metrics(c, j, n_boot, seed)}
    if kind == "rating":
        s = np.asarray(reward_fn([r[0] for r in rows], [r[1] for r in rows]), np.float64)
        gold = np.asarray([r[2] for r in rows], np.float64)
        return {"kind": kind, "n": len(rows), "pearson": pearson(s, gold), "spearman": spearman(s, gold)}
    raise ValueError(f"kind must be 'pairwise' or 'rating', got {kind!r}")


def _by_length(fn: Callable, chunk: int | None, log: Callable[[str], None] | None = None) -> Callable:
    """``fn(prompts, responses) -> [N] array or dict of [N, ...] arrays``, run on chunks of
    ``chunk`` rows sorted by ``len(prompt) + len(response)`` (each chunk padded to its own
    longest row) and put back in the input order."""
    def run(prompts, responses):
        n = len(prompts)
        if not chunk or n <= chunk:
            return fn(prompts, responses)
        order = np.argsort([len(p) + len(r) for p, r in zip(prompts, responses)], kind="stable")
        out = None
        t0 = time.perf_counter()
        for k, a in enumerate(range(0, n, chunk)):
            idx = order[a:a + chunk]
            got = fn([prompts[i] for i in idx], [responses[i] for i in idx])
            got = got if isinstance(got, dict) else {None: got}
            if out is None:
                out = {key: np.zeros((n,) + np.shape(v)[1:], np.float64) for key, v in got.items()}
            for key, v in got.items():
                out[key][idx] = np.asarray(v, np.float64)
            if log:
                log(f"  chunk {k + 1}/{-(-n // chunk)}: {min(a + chunk, n)}/{n} rows, {time.perf_counter() - t0:.0f}s")
        return out[None] if set(out) == {None} else out
    return run


def sweep_scores(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], *, aggregate: str = "difference",
                 template: str = "base", include_eot: bool = False, batch_size: int = 8,
                 max_context_len: int | None = None) -> dict[str, np.ndarray]:
    """Every reward of ``--sweep`` for each (prompt, response), float64 [N] each: ``flr/{mode}/{dim}``
    for both modes and every dimension and ``all`` (from ONE pass with all follow-ups), ``direct``,
    and ``length`` (the response's token count)."""
    from alignshift.rewards.flr import DIMENSIONS, FOLLOWUPS, MODES, aggregate_scores, direct_scores, followup_scores

    fs = followup_scores(model, tokenizer, prompts, responses, dimension="all", template=template,
                         include_eot=include_eot, batch_size=batch_size, max_context_len=max_context_len)
    n_pos = int(fs["is_positive"].sum())
    out: dict[str, np.ndarray] = {}
    p0 = n0 = 0
    cols = {}
    for d in DIMENSIONS:  # followups_for("all"): every dimension's positives, then every dimension's negatives
        np_, nn = len(FOLLOWUPS[d]["positive"]), len(FOLLOWUPS[d]["negative"])
        cols[d] = np.r_[p0:p0 + np_, n_pos + n0:n_pos + n0 + nn]
        p0, n0 = p0 + np_, n0 + nn
    cols["all"] = np.arange(len(fs["followups"]))
    for mode in MODES:
        for d, c in cols.items():
            out[f"flr/{mode}/{d}"] = aggregate_scores(fs[mode][:, c], fs["is_positive"][c], aggregate)
    out["direct"] = direct_scores(model, tokenizer, prompts, responses, batch_size=batch_size)
    out["length"] = np.asarray([len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses],
                               np.float64)
    return out


def _sweep_results(scores: dict[str, np.ndarray], n: int, n_boot: int, seed: int) -> dict:
    """Pairwise metrics of every swept reward; rows are ``chosen`` (first n) then ``rejected``."""
    split = {k: {"chosen": v[:n], "rejected": v[n:]} for k, v in scores.items()}
    return {k: _pair_metrics(v["chosen"], v["rejected"], n_boot, seed, None if k == "direct" else split["direct"])
            for k, v in split.items()}


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    from alignshift.rewards.flr import AGGREGATES, DIMENSIONS, MODES, TEMPLATES

    p = argparse.ArgumentParser(prog="python -m alignshift.rewards.evaluate",
                                description="Evaluate FLR or Direct rewards on local benchmark JSONL files.")
    p.add_argument("--model", required=True, help="Hugging Face model folder (weights + tokenizer with chat template)")
    p.add_argument("--bench", required=True, nargs="+", help="benchmark JSONL file(s)")
    p.add_argument("--layout", default="auto", help="file layout (default: auto-detect; one for all files)")
    p.add_argument("--reward", default="flr", choices=("flr", "direct"))
    p.add_argument("--dimension", default="understanding", help=f"one of {list(DIMENSIONS)} or 'all'")
    p.add_argument("--mode", default="likelihood", choices=MODES)
    p.add_argument("--aggregate", default="difference", choices=AGGREGATES)
    p.add_argument("--template", default="base", choices=TEMPLATES)
    p.add_argument("--include-eot", action="store_true", help="count the turn-end token in the follow-up likelihood")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-examples", type=int, default=None)
    p.add_argument("--max-context-len", type=int, default=None, help="left-truncate contexts to this many tokens")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--sample", type=int, default=None,
                   help="evaluate a seeded random subset of this many rows (after --skip-bad-rows)")
    p.add_argument("--sample-offset", type=int, default=0,
                   help="with --sample: skip the first K rows of the seeded permutation (a disjoint further sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of --sample and of the bootstrap")
    p.add_argument("--n-boot", type=int, default=10_000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--chunk", type=int, default=64,
                   help="score rows in chunks of this many, sorted by length (padding per chunk); 0: one chunk")
    p.add_argument("--hh-turns", action="store_true",
                   help="render HH transcript prompts as alternating chat turns (the FLR authors' multi-turn "
                        "rendering) instead of one user message holding the transcript")
    p.add_argument("--sweep", action="store_true",
                   help="pairwise files: FLR (both modes, every dimension and 'all', one follow-up pass), Direct "
                        "and a response-length baseline in one run")
    p.add_argument("--save-scores", default=None, help="with --sweep: write the per-row rewards here (.npz)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="drop malformed rows (bad JSON lines, missing fields, HH rows whose chosen/rejected "
                        "histories differ) instead of stopping; the dropped rows are counted and reported")
    return p


def _error_exit(e: BaseException) -> None:
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = " ".join(str(msg).split("\n")[0].split()) or type(e).__name__
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv=None) -> dict:
    """The CLI (module docstring). Returns the results dict; a data error (bad file, bad row,
    bad model folder) prints one ``error: ...`` line on stderr and exits with status 2."""
    args = _parser().parse_args(argv)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # read every benchmark first: a data error stops the run before the model is loaded
    benches = []
    try:
        for path in args.bench:
            rep = SkippedRows(keep=5)
            kind, layout, rows = load_bench(path, args.layout, args.max_examples, skip_bad_rows=args.skip_bad_rows,
                                            report=rep)
            if rep.count:
                print(f"{os.path.basename(path)}: {rep.summary()}", file=sys.stderr, flush=True)
            picked = None
            if args.sample is not None:
                if args.sample < 1:
                    raise ValueError(f"--sample must be >= 1, got {args.sample}")
                if args.sample_offset < 0:
                    raise ValueError(f"--sample-offset must be >= 0, got {args.sample_offset}")
                if args.sample < len(rows) or args.sample_offset:
                    # a slice of one seeded permutation: a larger --sample with the same seed keeps these rows,
                    # and --sample-offset K continues after the first K (disjoint runs add up)
                    perm = np.random.default_rng(args.seed).permutation(len(rows))
                    picked = sorted(perm[args.sample_offset:args.sample_offset + args.sample].tolist())
                    if not picked:
                        raise ValueError(f"{path}: --sample-offset {args.sample_offset} leaves no rows (of {len(rows)})")
                    rows = [rows[i] for i in picked]
            if args.sweep and kind != "pairwise":
                raise ValueError(f"{path}: --sweep evaluates pairwise files only (this one is {kind})")
            benches.append((path, kind, layout, rows, rep, picked))
    except (OSError, ValueError) as e:
        _error_exit(e)

    import jax.numpy as jnp

    from alignshift.models.hf import load_hf_model, load_hf_tokenizer
    from alignshift.rewards.flr import direct_scores, flr_scores

    try:
        model = load_hf_model(args.model, dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype])
        tok = load_hf_tokenizer(args.model)
    except (OSError, ValueError, KeyError) as e:
        _error_exit(e)
    if args.hh_turns:
        tok = HHTurnsTokenizer(tok)
    if args.sweep:
        fn = lambda p, r: sweep_scores(model, tok, p, r, aggregate=args.aggregate,  # noqa: E731
                                       template=args.template, include_eot=args.include_eot,
                                       batch_size=args.batch_size, max_context_len=args.max_context_len)
    elif args.reward == "flr":
        dim = args.dimension.split(",") if "," in args.dimension else args.dimension
        fn = lambda p, r: flr_scores(model, tok, p, r, dimension=dim, mode=args.mode,  # noqa: E731
                                     aggregate=args.aggregate, template=args.template,
                                     include_eot=args.include_eot, batch_size=args.batch_size,
                                     max_context_len=args.max_context_len)
    else:
        fn = lambda p, r: direct_scores(model, tok, p, r, batch_size=args.batch_size)  # noqa: E731
    fn = _by_length(fn, args.chunk, log)
    results = {}
    for path, kind, layout, rows, rep, picked in benches:
        t0 = time.perf_counter()
        try:
            if args.sweep:
                prompts = [r[0] for r in rows]
                scores = fn(prompts + prompts, [r[1] for r in rows] + [r[2] for r in rows])
                res = {"layout": layout, "kind": kind, "n": len(rows),
                       "methods": _sweep_results(scores, len(rows), args.n_boot, args.seed)}
                if args.save_scores:
                    np.savez(args.save_scores, **{k.replace("/", "."): v for k, v in scores.items()},
                             rows=np.asarray(picked if picked is not None else np.arange(len(rows))))
            else:
                res = {"layout": layout, **evaluate_reward(fn, kind, rows, n_boot=args.n_boot, seed=args.seed)}
        except ValueError as e:  # a row the tokenizer/template cannot score, a bad --dimension, ...
            _error_exit(ValueError(f"{path}: {e}"))
        res["seconds"] = round(time.perf_counter() - t0, 1)
        if picked is not None:
            res["sample"] = {"seed": args.seed, "rows": picked}
        if args.skip_bad_rows:
            res["skipped_rows"] = {"count": rep.count, "reasons": list(rep.reasons)}
        results[os.path.basename(path)] = res
        skipped = f", {rep.count} bad row(s) skipped" if rep.count else ""
        head = f"{os.path.basename(path)} [{layout}, n={res['n']}{skipped}]"
        if args.sweep:
            print(f"{head}: {res['seconds']:.0f}s", flush=True)
            for name, m in res["methods"].items():
                lo, hi = m["accuracy_ci95"]
                print(f"  {name:28s} accuracy {m['accuracy']:.4f} [{lo:.4f}, {hi:.4f}]  ties {m['ties']:.4f}", flush=True)
        elif kind == "pairwise":
            lo, hi = res["accuracy_ci95"]
            print(f"{head}: accuracy {res['accuracy']:.4f} [95% CI {lo:.4f}, {hi:.4f}]", flush=True)
        else:
            print(f"{head}: pearson {res['pearson']:.4f}  spearman {res['spearman']:.4f}", flush=True)
    out = {"model": args.model, "reward": "sweep" if args.sweep else args.reward, "dimension": args.dimension,
           "mode": args.mode, "aggregate": args.aggregate, "template": args.template, "hh_turns": args.hh_turns,
           "dtype": args.dtype, "batch_size": args.batch_size, "chunk": args.chunk, "n_boot": args.n_boot,
           "seed": args.seed, "max_context_len": args.max_context_len, "results": results,
           "seconds": round(time.perf_counter() - t_start, 1)}
    if args.out:
        from alignshift.eval.report import write_json_atomic

        write_json_atomic(args.out, out)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
