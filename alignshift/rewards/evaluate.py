"""Reward-model evaluation on local benchmark files: pairwise accuracy and rating correlation.

    python -m alignshift.rewards.evaluate --model PATH --bench shp.jsonl helpsteer.jsonl \
        [--reward flr|direct] [--dimension understanding] [--mode likelihood|repo] \
        [--aggregate difference|positive|negative] [--layout auto] [--max-examples N] [--out res.json] \
        [--skip-bad-rows]

``--model`` is a Hugging Face folder (``config.json`` + safetensors + tokenizer with a chat
template, loaded by :func:`alignshift.models.hf.load_hf_model` / ``load_hf_tokenizer``).
Nothing is downloaded: every benchmark is a local JSONL file, one example per line, in the
layout of the public release of the benchmarks FLR reports (spec §5.4). ``--layout auto``
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

Metrics are plain NumPy (float64) and checked against SciPy in the tests: Spearman is the
Pearson correlation of average ranks (ties share their mean rank); a constant input gives NaN.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np

from alignshift.data.schema import DataError, SkippedRows

__all__ = [
    "PAIRWISE_LAYOUTS",
    "RATING_LAYOUTS",
    "pairwise_accuracy",
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
    return text[:at + len(marker)], text[at + len(marker):].strip()


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


def evaluate_reward(reward_fn: Callable[[Sequence[str], Sequence[str]], np.ndarray], kind: str,
                    rows: list[tuple]) -> dict:
    """Score the rows with ``reward_fn(prompts, responses) -> [N]`` and compute the metrics."""
    if kind == "pairwise":
        prompts = [r[0] for r in rows]
        s = np.asarray(reward_fn(prompts + prompts, [r[1] for r in rows] + [r[2] for r in rows]), np.float64)
        c, j = s[: len(rows)], s[len(rows):]
        return {"kind": kind, "n": len(rows), "accuracy": pairwise_accuracy(c, j),
                "ties": float(np.mean(c == j))}
    if kind == "rating":
        s = np.asarray(reward_fn([r[0] for r in rows], [r[1] for r in rows]), np.float64)
        gold = np.asarray([r[2] for r in rows], np.float64)
        return {"kind": kind, "n": len(rows), "pearson": pearson(s, gold), "spearman": spearman(s, gold)}
    raise ValueError(f"kind must be 'pairwise' or 'rating', got {kind!r}")


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
    # read every benchmark first: a data error stops the run before the model is loaded
    benches = []
    try:
        for path in args.bench:
            rep = SkippedRows(keep=5)
            kind, layout, rows = load_bench(path, args.layout, args.max_examples, skip_bad_rows=args.skip_bad_rows,
                                            report=rep)
            if rep.count:
                print(f"{os.path.basename(path)}: {rep.summary()}", file=sys.stderr, flush=True)
            benches.append((path, kind, layout, rows, rep))
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
    if args.reward == "flr":
        dim = args.dimension.split(",") if "," in args.dimension else args.dimension
        fn = lambda p, r: flr_scores(model, tok, p, r, dimension=dim, mode=args.mode,  # noqa: E731
                                     aggregate=args.aggregate, template=args.template,
                                     include_eot=args.include_eot, batch_size=args.batch_size,
                                     max_context_len=args.max_context_len)
    else:
        fn = lambda p, r: direct_scores(model, tok, p, r, batch_size=args.batch_size)  # noqa: E731
    results = {}
    for path, kind, layout, rows, rep in benches:
        try:
            res = {"layout": layout, **evaluate_reward(fn, kind, rows)}
        except ValueError as e:  # a row the tokenizer/template cannot score, a bad --dimension, ...
            _error_exit(ValueError(f"{path}: {e}"))
        if args.skip_bad_rows:
            res["skipped_rows"] = {"count": rep.count, "reasons": list(rep.reasons)}
        results[os.path.basename(path)] = res
        metric = (f"accuracy {res['accuracy']:.4f}" if kind == "pairwise"
                  else f"pearson {res['pearson']:.4f}  spearman {res['spearman']:.4f}")
        skipped = f", {rep.count} bad row(s) skipped" if rep.count else ""
        print(f"{os.path.basename(path)} [{layout}, n={res['n']}{skipped}]: {metric}", flush=True)
    out = {"model": args.model, "reward": args.reward, "dimension": args.dimension, "mode": args.mode,
           "aggregate": args.aggregate, "template": args.template, "results": results}
    if args.out:
        from alignshift.eval.report import write_json_atomic

        write_json_atomic(args.out, out)
    return out


if __name__ == "__main__":
    main()
    sys.exit(0)
