"""Shared pieces of the dataset adapters: row loading, candidate examples, split recipes.

Every adapter maps rows of a published dataset to our schema:

* :class:`alignshift.data.PreferenceExample` ``(prompt, chosen, rejected, meta)`` for pairwise
  data, or
* :class:`CandidateExample` ``(prompt, candidates, scores, meta)`` for K candidates per prompt
  with one or more score columns (UltraFeedback completions, HelpSteer2 responses, DoRA's
  K-candidate lists); :func:`best_worst_pairs` turns them into pairs.

``meta`` always holds ``source`` (the adapter name) and the row index in the loaded split
(``row``), plus adapter-specific metadata (domain, safety flags, scores, ...). A chat prompt
with several turns is kept in ``meta["prompt_messages"]`` (a list of ``{"role", "content"}``)
so :mod:`alignshift.data.chat` can apply the model's chat template; ``prompt`` is then the
last user turn.

Rows are read with :func:`load_rows` from a hub name (``datasets.load_dataset(name, ...)``)
or a local path: a ``.jsonl``/``.json``/``.parquet`` file, or a folder holding
``{split}.jsonl`` / ``{split}.parquet`` (or ``{split}-*.parquet``) files, or any folder
``datasets.load_dataset`` understands. Nothing is downloaded unless a hub name is given.
A malformed row raises :class:`alignshift.data.DataError` naming the dataset, the row index
and the field; a local JSON/JSONL file that ``datasets`` cannot read raises one naming the file
and the line (a bad line is skipped and counted instead with ``skip_bad_rows``).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from alignshift.data.schema import DataError, PreferenceExample, SkippedRows, read_jsonl_rows

__all__ = [
    "CandidateExample",
    "DatasetSplits",
    "load_rows",
    "require",
    "require_text",
    "best_worst_pairs",
    "shift_split",
    "zscore_columns",
]

_LOCAL_EXT = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclasses.dataclass(frozen=True)
class CandidateExample:
    """A prompt with K >= 2 candidate responses and per-candidate scores.

    ``scores`` maps an objective name to a list of K floats (NaN = not rated).
    """

    prompt: str
    candidates: list
    scores: dict
    meta: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        k = len(self.candidates)
        for name, vals in self.scores.items():
            if len(vals) != k:
                raise DataError(f"row {self.meta.get('row', '?')}: scores[{name!r}] has {len(vals)} values "
                                f"for {k} candidates")


@dataclasses.dataclass
class DatasetSplits:
    """What an adapter returns: named splits of examples plus measured info about them."""

    train: list
    val: list = dataclasses.field(default_factory=list)
    test: list = dataclasses.field(default_factory=list)
    info: dict = dataclasses.field(default_factory=dict)

    def split(self, name: str) -> list:
        if name not in ("train", "val", "test"):
            raise KeyError(f"unknown split {name!r}; expected train, val or test")
        return getattr(self, name)


# ------------------------------------------------------------------------------------ loading


def _local_files(path: str, split: str) -> tuple[str, list[str]] | None:
    """(builder, files) for a local file or a folder of per-split files; None if not local."""
    if os.path.isfile(path):
        ext = os.path.splitext(path)[1].lower()
        if ext not in _LOCAL_EXT:
            raise DataError(f"{path}: unsupported file type {ext!r}; use .jsonl, .json, .parquet or .csv")
        return _LOCAL_EXT[ext], [path]
    if os.path.isdir(path):
        for ext, builder in _LOCAL_EXT.items():
            files = sorted(glob.glob(os.path.join(path, f"{split}{ext}")) +
                           glob.glob(os.path.join(path, f"{split}-*{ext}")) +
                           glob.glob(os.path.join(path, "data", f"{split}-*{ext}")))
            if files:
                return builder, files
        return "", []
    return None


def _first_char(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head[:1].decode("ascii", "replace")


def _json_file_rows(path: str, *, skip_bad_rows: bool, report: SkippedRows | None) -> list[dict]:
    """The rows of one local JSON file read without ``datasets``: a JSON array of objects, or
    JSON lines (a bad line raises :class:`DataError` naming the file and the line, or is
    skipped and counted in ``report`` with ``skip_bad_rows``)."""
    if _first_char(path) == "[":  # one JSON document: an array of row objects
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path} line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
        rows = []
        for i, r in enumerate(doc):
            if isinstance(r, dict):
                rows.append(r)
                continue
            err = DataError(f"{path} item {i}: expected a JSON object, got {type(r).__name__}")
            if not skip_bad_rows:
                raise err
            if report is not None:
                report.add(path, err)
        return rows
    return read_jsonl_rows(path, skip_bad_rows=skip_bad_rows, report=report)


def _load_json_files(hfds, files: list[str], split: str, *, dataset: str, skip_bad_rows: bool,
                     report: SkippedRows | None) -> list[dict]:
    """Local JSON/JSONL files through ``datasets``; when it fails (its error names neither the
    file nor the line), the files are read line by line to find and name the bad line."""
    try:
        return [dict(r) for r in hfds.load_dataset("json", data_files={split: files}, split=split)]
    except Exception as e:  # noqa: BLE001 - datasets wraps pyarrow's errors in DatasetGenerationError
        err = e
    rows = []
    for f in files:
        rows += _json_file_rows(f, skip_bad_rows=skip_bad_rows, report=report)
    if len(rows) and not skip_bad_rows:
        # every line is a JSON object, yet datasets could not make a table of them: say why
        cause = err.__cause__ or err
        raise DataError(f"{dataset}: datasets could not read {', '.join(files)}: "
                        f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    # skip_bad_rows: the good rows, with every row given every column (None where absent), as datasets does
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return [{k: r.get(k) for k in keys} for r in rows]


def load_rows(source: str, split: str = "train", *, name: str | None = None, data_dir: str | None = None,
              max_rows: int | None = None, dataset: str = "dataset", skip_bad_rows: bool = False,
              report: SkippedRows | None = None) -> list[dict]:
    """Rows (plain dicts) of ``split`` from a local file/folder or a hub dataset name.

    ``name`` is the hub config name and ``data_dir`` the hub sub-folder (e.g. HH-RLHF's
    ``harmless-base``); for a local folder ``data_dir`` is joined to the path. ``max_rows``
    keeps the first rows only. ``dataset`` names the adapter in error messages.

    A local JSON/JSONL line that is not valid JSON (or not an object) raises
    :class:`DataError` naming the file and the line; with ``skip_bad_rows`` such lines are
    dropped and counted in ``report`` instead.
    """
    import datasets as hfds

    if not isinstance(source, str) or not source:
        raise DataError(f"{dataset}: source must be a hub name or a local path, got {source!r}")
    path = os.path.join(source, data_dir) if (data_dir and os.path.isdir(source)) else source
    local = _local_files(path, split)
    if local is not None:
        builder, files = local
        if builder == "json":
            rows = _load_json_files(hfds, files, split, dataset=dataset, skip_bad_rows=skip_bad_rows,
                                    report=report)
            return rows if max_rows is None else rows[: int(max_rows)]
        if builder:
            ds = hfds.load_dataset(builder, data_files={split: files}, split=split)
        else:  # a folder datasets knows how to read (e.g. a saved hub snapshot)
            ds = hfds.load_dataset(path, name=name, split=split)
    else:
        looks_local = (source.startswith((".", "/", "~")) or os.path.splitext(source)[1].lower() in _LOCAL_EXT
                       or source.count("/") > 1)
        if looks_local:
            raise DataError(f"{dataset}: local path {source!r} does not exist (a hub name looks like 'owner/name')")
        ds = hfds.load_dataset(source, name=name, data_dir=data_dir, split=split)
    if max_rows is not None:
        ds = ds.select(range(min(int(max_rows), len(ds))))
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- row checking


def require(row: Mapping, field: str, i: int, dataset: str) -> Any:
    if not isinstance(row, Mapping):
        raise DataError(f"{dataset} row {i}: expected a mapping, got {type(row).__name__}")
    if field not in row or row[field] is None:
        raise DataError(f"{dataset} row {i}: field {field!r} is missing")
    return row[field]


def require_text(row: Mapping, field: str, i: int, dataset: str) -> str:
    v = require(row, field, i, dataset)
    if not isinstance(v, str):
        raise DataError(f"{dataset} row {i}: field {field!r} must be a str, got {type(v).__name__}")
    if not v.strip():
        raise DataError(f"{dataset} row {i}: field {field!r} is empty")
    return v


def require_number(row: Mapping, field: str, i: int, dataset: str) -> float:
    v = require(row, field, i, dataset)
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise DataError(f"{dataset} row {i}: field {field!r} must be a number, got {v!r}")
    return float(v)


def messages_or_text(value: Any, i: int, field: str, dataset: str) -> list[dict]:
    """A chat as a list of ``{"role", "content"}`` dicts (a plain string is one user turn)."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, (list, tuple)) or not value:
        raise DataError(f"{dataset} row {i}: field {field!r} must be a string or a non-empty list of messages")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{dataset} row {i}: field {field!r} message {j} must have str 'role' and 'content'")
        out.append({"role": m["role"], "content": m["content"]})
    return out


# ------------------------------------------------------------------------------ candidates


def zscore_columns(examples: Sequence[CandidateExample], objectives: Sequence[str]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation of each objective over every rated candidate of the split
    (NaNs ignored), as the WDPO preference generator z-scores ArmoRM objectives per split."""
    out = {}
    for obj in objectives:
        vals = np.asarray([v for ex in examples for v in ex.scores.get(obj, [])], np.float64)
        vals = vals[np.isfinite(vals)]
        if vals.size == 0:
            raise DataError(f"objective {obj!r} has no finite scores in this split")
        sd = float(vals.std())
        out[obj] = (float(vals.mean()), sd if sd > 0 else 1.0)
    return out


def best_worst_pairs(
    examples: Sequence[CandidateExample],
    weights: Mapping[str, float],
    *,
    zscore: bool = True,
    min_gap: float = 0.0,
) -> list[PreferenceExample]:
    """Pairs from K candidates by a weighted mixture of objectives (the WDPO recipe):

    ``score_k = Σ_o weights[o] · z_o(candidate k)`` with ``z_o`` the objective z-scored over
    the whole split (``zscore=False``: raw scores); chosen = argmax, rejected = argmin within
    the prompt. Prompts whose best and worst mixed scores differ by ``<= min_gap``, or with
    fewer than two candidates rated on every weighted objective, are skipped. ``meta`` gets
    ``score_chosen``, ``score_rejected`` and the candidate indices.
    """
    if not weights:
        raise ValueError("best_worst_pairs: weights must name at least one objective")
    objectives = list(weights)
    for ex in examples:
        missing = [o for o in objectives if o not in ex.scores]
        if missing:
            raise DataError(f"row {ex.meta.get('row', '?')}: no scores for objective(s) {missing}; "
                            f"has {sorted(ex.scores)}")
    stats = zscore_columns(examples, objectives) if zscore else {o: (0.0, 1.0) for o in objectives}
    out = []
    for ex in examples:
        mixed = np.zeros(len(ex.candidates))
        for o in objectives:
            mu, sd = stats[o]
            mixed += float(weights[o]) * (np.asarray(ex.scores[o], np.float64) - mu) / sd
        ok = np.isfinite(mixed)
        if ok.sum() < 2:
            continue
        idx = np.flatnonzero(ok)
        hi = int(idx[np.argmax(mixed[idx])])
        lo = int(idx[np.argmin(mixed[idx])])
        if mixed[hi] - mixed[lo] <= min_gap or ex.candidates[hi].strip() == ex.candidates[lo].strip():
            continue
        meta = {**ex.meta, "score_chosen": float(mixed[hi]), "score_rejected": float(mixed[lo]),
                "chosen_index": hi, "rejected_index": lo}
        out.append(PreferenceExample(ex.prompt, ex.candidates[hi], ex.candidates[lo], meta))
    return out


# ---------------------------------------------------------------------------- split recipes


def shift_split(
    examples: Sequence,
    is_deploy: Callable[[Any], bool],
    *,
    deploy_fraction: float = 0.25,
    val_ratio: float = 1.0 / 50.0,
    n_test: int | None = None,
    test_examples: Sequence | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """The IW-DPO deployment-shift recipe (docs/methods.md §8), for any "deployment" predicate.

    Deployment-type examples (``is_deploy``) are shuffled and split into a training part, a
    validation set and a test set; every non-deployment example goes to train. The training
    part is sized so deployment-type pairs are ``deploy_fraction`` of ``D_tr``
    (``n_dep = round(f/(1-f) · n_other)``); ``|D_v| = max(1, round(val_ratio · |D_tr|))``
    (fifty times smaller by default); the test set is the remaining deployment-type pairs
    (at most ``n_test``), or the deployment-type pairs of ``test_examples`` when given (e.g.
    the dataset's own test split). When there are too few deployment-type pairs for the
    requested fraction, the non-deployment part is subsampled so the fraction still holds.
    ``meta["split"]`` and ``meta["deploy"]`` are set on every returned example.
    """
    if not 0.0 < deploy_fraction < 1.0:
        raise ValueError(f"deploy_fraction must be in (0, 1), got {deploy_fraction}")
    if not 0.0 < val_ratio < 1.0:
        raise ValueError(f"val_ratio must be in (0, 1), got {val_ratio}")
    rng = np.random.default_rng(seed)
    dep = [e for e in examples if is_deploy(e)]
    other = [e for e in examples if not is_deploy(e)]
    dep = [dep[i] for i in rng.permutation(len(dep))]
    other = [other[i] for i in rng.permutation(len(other))]
    if not dep:
        raise DataError("shift_split: no deployment-type examples in the data")
    ratio = deploy_fraction / (1.0 - deploy_fraction)

    def sizes(n_other: int) -> tuple[int, int]:
        n_dep = max(1, round(ratio * n_other)) if n_other else 0
        n_val = max(1, round(val_ratio * (n_other + n_dep)))
        return n_dep, n_val

    n_other = len(other)
    n_dep, n_val = sizes(n_other)
    need_test = 0 if test_examples is not None else 1
    while n_other > 0 and n_dep + n_val + need_test > len(dep):
        n_other = int(n_other * 0.9) if n_other > 10 else n_other - 1
        n_dep, n_val = sizes(n_other)
    if n_dep + n_val + need_test > len(dep):
        raise DataError(f"shift_split: only {len(dep)} deployment-type examples; too few for a train/val/test split")
    other = other[:n_other]
    train_dep, val = dep[:n_dep], dep[n_dep:n_dep + n_val]
    if test_examples is not None:
        test = [e for e in test_examples if is_deploy(e)]
    else:
        test = dep[n_dep + n_val:]
    if n_test is not None:
        test = test[: int(n_test)]
    train = train_dep + other
    train = [train[i] for i in rng.permutation(len(train))]

    def tag(items, split):
        out = []
        for e in items:
            meta = {**e.meta, "split": split, "deploy": bool(is_deploy(e))}
            out.append(dataclasses.replace(e, meta=meta))
        return out

    info = {"n_train": len(train), "n_val": len(val), "n_test": len(test),
            "train_deploy_share": (len(train_dep) / len(train)) if train else math.nan,
            "n_deploy_available": len(dep), "n_other_used": n_other}
    return DatasetSplits(tag(train, "train"), tag(val, "val"), tag(test, "test"), info)
