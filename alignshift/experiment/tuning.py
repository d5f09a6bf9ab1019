"""Equal tuning budgets (issue 19): every method, DPO included, is trained on the same number of
configurations, the one with the best metric on a held-out share of the TRAINING pairs is kept,
and only that one is scored on the test set.

The ``tuning:`` section of a config (:class:`alignshift.config.TuningConfig`)::

    tuning:
      enabled: true
      budget: 9                     # configurations per method, the same for every method
      strategy: random              # random: `budget` of the method's grid, seeded | grid: all of it (= budget)
      seed: 0                       # which configurations `random` draws (not the training seed)
      metric: pref_acc              # implicit-reward accuracy on the selection split (higher is better)
      val_fraction: 0.2             # the selection split: this share of D_tr, held out from training
      grid:                         # every method's β and learning rate
        train.optim.lr: [3.0e-5, 1.0e-4, 3.0e-4]
        base_kwargs.beta: [0.03, 0.1, 0.3]
      method_grid:                  # a method's own knob on top: its grid is the product, of which
        kldpo: {weighting_kwargs.tau: [0.05, 0.5, 1.0]}   # `budget` are drawn (seeded by the grid)

Per seed (:func:`split_for_tuning`, then :func:`tune_method` per method):

1. ``val_fraction`` of the training pairs become the selection split ``ctx.sets["tune_val"]``
   (seeded by ``tuning.seed`` and the seed); every method trains on the rest. A method on
   ``train+val`` (IW-DPO's competitor, DPO on D_tr ∪ D_v) gets the same reduced D_tr plus D_v;
   D_v (IW-DPO's deployment batches) and the oracle set are not split. The selection split is
   of the TRAINING distribution for every method, whatever data it trains on.
2. Each of the method's configurations (:func:`method_candidates`) is trained from the
   reference; its ``metric`` on the selection split is recorded; the best (the first on a
   tie, in grid order) is kept and evaluated on the test set like an untuned method.

``summary.json`` gets, per seed, ``tuning`` (the split, and per method every configuration's
score and the selected one) and, in each tuned method's row, ``select_<metric>`` (the selected
configuration's score) and ``tuning_time_s`` (all its configurations' training); the aggregate
``tuning`` lists each method's selections by seed. Candidates log to ``metrics.jsonl`` as phase
``tuning`` with their ``candidate`` index.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
import typing
import zlib

import numpy as np

from alignshift.config import ConfigError, ExperimentConfig, MethodConfig, _coerce, tuning_grid

__all__ = ["method_candidates", "apply_candidate", "candidate_label", "split_indices", "take_rows",
           "split_for_tuning", "TuneResult", "tune_method", "aggregate_tuning"]


def method_candidates(cfg: ExperimentConfig, m: MethodConfig) -> list[dict]:
    """Method ``m``'s ``tuning.budget`` configurations ``{dotted key: value}``: its grid
    (:func:`alignshift.config.tuning_grid`) in product order when it has exactly ``budget``
    points (always for ``strategy: grid``), else ``budget`` of them drawn without replacement,
    seeded by ``tuning.seed`` and the grid itself (methods with the same grid, e.g. KLDPO and
    its normalised form, draw the same configurations), kept in grid order."""
    t = cfg.tuning
    grid = tuning_grid(cfg, m)
    keys = list(grid)
    product = list(itertools.product(*(grid[k] for k in keys)))
    if len(product) < t.budget or (t.strategy == "grid" and len(product) != t.budget):
        raise ConfigError(f"tuning: method {m.name!r} has {len(product)} configurations for a budget of {t.budget}")
    if len(product) > t.budget:
        rng = np.random.default_rng([t.seed, zlib.crc32(json.dumps(grid, sort_keys=True, default=str).encode())])
        product = [product[i] for i in sorted(rng.choice(len(product), t.budget, replace=False).tolist())]
    return [dict(zip(keys, vals)) for vals in product]


def _set_path(obj, path: list[str], value, key: str):
    name = path[0]
    if len(path) == 1:
        tp = typing.get_type_hints(type(obj))[name]
        return dataclasses.replace(obj, **{name: _coerce(value, tp, key)})
    return dataclasses.replace(obj, **{name: _set_path(getattr(obj, name), path[1:], value, key)})


def apply_candidate(cfg: ExperimentConfig, m: MethodConfig, cand: dict) -> tuple[ExperimentConfig, MethodConfig]:
    """``(cfg, m)`` with the configuration's values: ``train.*`` keys set on the config (typed
    as the field: a YAML ``'1e-4'`` string becomes a float), ``*_kwargs.<name>`` keys on the method."""
    for key, value in cand.items():
        if key.startswith("train."):
            cfg = _set_path(cfg, key.split("."), value, key)
        else:
            group, name = key.split(".", 1)
            m = dataclasses.replace(m, **{group: {**getattr(m, group), name: value}})
    return cfg, m


def candidate_label(cand: dict) -> str:
    """``lr=0.0001 beta=0.1 tau=0.5``: the last part of each key."""
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in cand.items()) or "(defaults)"


def split_indices(n: int, fraction: float, seed: int, tuning_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, held)``: a seeded ``fraction`` of ``range(n)`` held out (at least 1, at most
    n − 1), both sorted."""
    if n < 2:
        raise ValueError(f"tuning needs at least 2 training pairs to hold some out; got {n}")
    n_held = min(max(1, int(round(fraction * n))), n - 1)
    perm = np.random.default_rng([tuning_seed, seed, 7177]).permutation(n)
    return np.sort(perm[n_held:]), np.sort(perm[:n_held])


def take_rows(arrays: dict, idx: np.ndarray) -> dict:
    """Rows ``idx`` of every array of an encoded set (all share the leading axis)."""
    return {k: np.asarray(v)[idx] for k, v in arrays.items()}


def split_for_tuning(ctx, names: tuple[str, ...] = ("train",), select_from: str | None = None) -> dict:
    """Carve the selection split: rows of ``ctx.sets[select_from]`` (default the first of
    ``names``) become ``ctx.sets["tune_val"]``, and every set in ``names`` (index-aligned with
    it) keeps the other rows; ``ctx.extra["train_keep"]`` records the kept row indices and
    ``train+val`` is rebuilt from the reduced ``train``. Returns the split's description."""
    t = ctx.cfg.tuning
    select_from = select_from or names[0]
    n = ctx.sets[select_from]["chosen_input_ids"].shape[0]
    keep, held = split_indices(n, t.val_fraction, ctx.seed, t.seed)
    ctx.sets["tune_val"] = take_rows(ctx.sets[select_from], held)
    for name in names:
        ctx.sets[name] = take_rows(ctx.sets[name], keep)
    ctx.extra["train_keep"] = keep
    if "train+val" in ctx.sets and "train" in names and "val" in ctx.sets:
        a, b = ctx.sets["train"], ctx.sets["val"]
        ctx.sets["train+val"] = {k: np.concatenate([a[k], b[k]]) for k in a if k in b}
    return {"from": select_from, "n_total": int(n), "n_train": int(len(keep)), "n_select": int(len(held)),
            "val_fraction": float(t.val_fraction)}


@dataclasses.dataclass
class TuneResult:
    """The selected configuration of one method and seed: its run (method and config with the
    selected values), trained params, score and training time; ``record`` for summary.json."""

    run: object
    params: object
    score: float
    train_s: float
    total_s: float
    record: dict


def tune_method(ctx, run, train_fn) -> TuneResult:
    """Train ``run`` on each of its configurations (``train_fn(ctx, run, candidate=i)`` ->
    ``(params, seconds)``), score each on ``ctx.sets["tune_val"]`` and keep the best."""
    from alignshift.eval.shift_eval import preference_accuracy
    from alignshift.train.phases import objective_for

    t = ctx.cfg.tuning
    cands = method_candidates(ctx.cfg, run.method)
    best = None
    records = []
    t0 = time.perf_counter()
    for i, cand in enumerate(cands):
        cfg_i, m_i = apply_candidate(run.cfg, run.method, cand)
        run_i = dataclasses.replace(run, method=m_i, cfg=cfg_i, checkpoint=False)
        params, secs = train_fn(ctx, run_i, candidate=i)
        acc = preference_accuracy(ctx.logits_fn, params, ctx.sets["tune_val"], objective_for(m_i),
                                  batch_size=ctx.cfg.eval.batch_size)
        score = float(acc[t.metric])
        records.append({"values": cand, t.metric: score, "train_time_s": secs})
        print(f"    tune {run.name} [{i + 1}/{len(cands)}] {candidate_label(cand)}: select {t.metric} {score:.4f} "
              f"({secs:.1f}s)", flush=True)
        if best is None or score > best[0]:  # strict: the first best in grid order wins a tie
            best = (score, i, params, run_i, secs)
        del params
    score, i, params, run_i, secs = best
    record = {"metric": t.metric, "selected_index": i, "selected": cands[i], "score": score,
              "candidates": records}
    return TuneResult(run_i, params, score, secs, time.perf_counter() - t0, record)


def aggregate_tuning(cfg: ExperimentConfig, summaries: list[dict]) -> dict:
    """The aggregate ``tuning`` entry: the settings, and per method its selection in each seed
    (values, index, score) and the mean selected score."""
    t = cfg.tuning
    out = {"budget": t.budget, "strategy": t.strategy, "metric": t.metric, "val_fraction": t.val_fraction,
           "split": {str(s["seed"]): s["tuning"]["split"] for s in summaries}, "methods": {}}
    for name in summaries[0]["tuning"]["methods"]:
        recs = {str(s["seed"]): s["tuning"]["methods"][name] for s in summaries}
        out["methods"][name] = {
            "candidates": [c["values"] for c in next(iter(recs.values()))["candidates"]],
            "selected_by_seed": {seed: {"index": r["selected_index"], "values": r["selected"], "score": r["score"]}
                                 for seed, r in recs.items()},
            "mean_score": float(np.mean([r["score"] for r in recs.values()])),
        }
    return out
