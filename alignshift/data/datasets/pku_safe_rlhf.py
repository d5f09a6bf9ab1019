"""PKU-SafeRLHF (``PKU-Alignment/PKU-SafeRLHF``, v1 layout) and the IW-DPO split recipe.

Published schema (one row = a prompt and two responses with decoupled labels):
``prompt``, ``response_0``, ``response_1``, ``prompt_source``, ``response_{0,1}_source``,
``is_response_{0,1}_safe`` (bool), ``response_{0,1}_harm_category`` (dict of 19 bools),
``response_{0,1}_severity_level`` (int 0-3), ``better_response_id`` (the more *helpful*
response, 0/1) and ``safer_response_id`` (0/1). Splits: ``train``, ``test``; hub configs
``default``, ``alpaca-7b``, ``alpaca2-7b``, ``alpaca3-8b``.

Mapping: ``label="helpfulness"`` (default; the IW-DPO recipe) makes ``better_response_id``
the chosen response, ``label="safety"`` uses ``safer_response_id``. ``meta`` holds the
safety flags of chosen and rejected, their severity levels and true harm categories, the
response sources, and ``category``:

* ``helpful_harmless`` -- the chosen (more helpful) response is safe: the deployment
  distribution of the IW-DPO paper;
* ``helpful_harmful`` -- the chosen response is unsafe (the training-only regime).

:func:`iw_dpo_splits` applies the recipe of docs/methods.md §8: ``D_tr`` = all helpful-harmful pairs
plus a helpful-harmless part that is 25% of ``D_tr``; ``D_v`` = helpful-harmless pairs, 50
times smaller than ``D_tr``; ``D_te`` = the remaining helpful-harmless pairs (or those of
the dataset's ``test`` split). Which pairs count as "helpful-harmless" in the paper is not
verified [INFER]: we use "the more helpful response is safe" (as ShiftBench's
``deploy_shift`` does); ``strict=True`` also requires the rejected response of a
helpful-harmful pair to be safe (a clean "helpfulness vs safety" conflict).
"""

from __future__ import annotations

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, convert_rows

from .base import DatasetSplits, load_rows, require, require_text, shift_split

__all__ = ["HUB_NAME", "HELPFUL_HARMLESS", "HELPFUL_HARMFUL", "pku_row_to_example", "load_pku_safe_rlhf",
           "iw_dpo_splits"]

HUB_NAME = "PKU-Alignment/PKU-SafeRLHF"
NAME = "pku_safe_rlhf"
HELPFUL_HARMLESS = "helpful_harmless"
HELPFUL_HARMFUL = "helpful_harmful"


def _bool(row, field, i):
    v = require(row, field, i, NAME)
    if not isinstance(v, bool):
        raise DataError(f"{NAME} row {i}: field {field!r} must be a bool, got {v!r}")
    return v


def _index(row, field, i):
    v = require(row, field, i, NAME)
    if isinstance(v, bool) or v not in (0, 1):
        raise DataError(f"{NAME} row {i}: field {field!r} must be 0 or 1, got {v!r}")
    return int(v)


def pku_row_to_example(row: dict, i: int, *, label: str = "helpfulness") -> PreferenceExample:
    if label not in ("helpfulness", "safety"):
        raise ValueError(f"label must be 'helpfulness' or 'safety', got {label!r}")
    prompt = require_text(row, "prompt", i, NAME)
    resp = [require_text(row, f"response_{k}", i, NAME) for k in (0, 1)]
    safe = [_bool(row, f"is_response_{k}_safe", i) for k in (0, 1)]
    better = _index(row, "better_response_id", i)
    safer = _index(row, "safer_response_id", i)
    c = better if label == "helpfulness" else safer
    r = 1 - c
    if resp[c].strip() == resp[r].strip():
        raise DataError(f"{NAME} row {i}: field 'response_1' is identical to field 'response_0'")

    def harms(k):
        cats = row.get(f"response_{k}_harm_category") or {}
        return sorted(name for name, flag in cats.items() if flag) if isinstance(cats, dict) else []

    meta = {
        "source": NAME, "row": i, "label": label,
        "category": HELPFUL_HARMLESS if safe[better] else HELPFUL_HARMFUL,
        "chosen_safe": safe[c], "rejected_safe": safe[r],
        "better_response_id": better, "safer_response_id": safer,
        "chosen_severity": row.get(f"response_{c}_severity_level"),
        "rejected_severity": row.get(f"response_{r}_severity_level"),
        "chosen_harm_categories": harms(c), "rejected_harm_categories": harms(r),
        "prompt_source": row.get("prompt_source"),
        "chosen_model": row.get(f"response_{c}_source"), "rejected_model": row.get(f"response_{r}_source"),
    }
    return PreferenceExample(prompt, resp[c], resp[r], meta)


def load_pku_safe_rlhf(source: str = HUB_NAME, split: str = "train", *, name: str | None = None,
                       label: str = "helpfulness", max_rows: int | None = None, skip_bad_rows: bool = False,
                       report: SkippedRows | None = None) -> list[PreferenceExample]:
    """Rows of ``split`` as preference examples (see the module docstring); with
    ``skip_bad_rows`` malformed rows are dropped and counted in ``report``."""
    rows = load_rows(source, split, name=name, max_rows=max_rows, dataset=NAME)
    return convert_rows(rows, lambda r, i: pku_row_to_example(r, i, label=label), source=f"{NAME}/{split}",
                        skip_bad_rows=skip_bad_rows, report=report)


def iw_dpo_splits(source: str = HUB_NAME, *, name: str | None = None, deploy_fraction: float = 0.25,
                  val_ratio: float = 1.0 / 50.0, n_test: int | None = None, use_test_split: bool = True,
                  strict: bool = False, seed: int = 0, max_rows: int | None = None, skip_bad_rows: bool = False,
                  report: SkippedRows | None = None) -> DatasetSplits:
    """The IW-DPO PKU-SafeRLHF recipe (module docstring) -> ``DatasetSplits(train, val, test)``.

    With ``use_test_split`` the test set is the helpful-harmless pairs of the dataset's own
    ``test`` split; otherwise it is carved out of ``train``'s helpful-harmless pairs.
    """
    bad = dict(skip_bad_rows=skip_bad_rows, report=report)
    train_rows = load_pku_safe_rlhf(source, "train", name=name, max_rows=max_rows, **bad)
    if strict:
        train_rows = [e for e in train_rows
                      if e.meta["category"] == HELPFUL_HARMLESS or e.meta["rejected_safe"]]
    test_rows = load_pku_safe_rlhf(source, "test", name=name, max_rows=max_rows, **bad) if use_test_split else None
    out = shift_split(train_rows, lambda e: e.meta["category"] == HELPFUL_HARMLESS,
                      deploy_fraction=deploy_fraction, val_ratio=val_ratio, n_test=n_test,
                      test_examples=test_rows, seed=seed)
    out.info.update({"dataset": NAME, "recipe": "iw_dpo", "deploy_category": HELPFUL_HARMLESS,
                     "train_category_share": {
                         HELPFUL_HARMLESS: sum(e.meta["category"] == HELPFUL_HARMLESS for e in out.train)
                         / max(1, len(out.train)),
                         HELPFUL_HARMFUL: sum(e.meta["category"] == HELPFUL_HARMFUL for e in out.train)
                         / max(1, len(out.train))}})
    return out
