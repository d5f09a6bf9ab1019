"""Equal tuning budgets (issue 19): the ``tuning:`` section, candidate grids, the selection split,
paired differences vs DPO with 95% t-intervals, and a tiny tuned run end to end."""

from __future__ import annotations

import json
import math
import os
import types

import numpy as np
import pytest
from scipy import stats

from alignshift.config import ConfigError, MethodConfig, load_config
from alignshift.eval.report import paired_differences, t_interval
from alignshift.experiment import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments", "configs", "shift_demo.yaml")
METHODS = "methods=[{name: dpo, base: dpo}, {name: kldpo, base: dpo, weighting: kl_dro}, {name: rrhf, base: rrhf}]"
GRID = ("tuning={enabled: true, budget: 4, grid: {train.optim.lr: [1.0e-4, 3.0e-4], base_kwargs.beta: [0.1, 0.3]}, "
        "method_grid: {kldpo: {weighting_kwargs.tau: [0.05, 0.5, 1.0]}, rrhf: {base_kwargs.sft_weight: [0.5, 1.0]}}}")


def _cfg(*extra):
    return load_config(DEMO, [METHODS, GRID, "train.precompute_reference=true", *extra])


def test_every_method_gets_the_same_budget():
    cfg = _cfg()
    by = {m.name: tuning.method_candidates(cfg, m) for m in cfg.methods}
    assert {n: len(c) for n, c in by.items()} == {"dpo": 4, "kldpo": 4, "rrhf": 4}
    # DPO: its whole 2 x 2 grid of (lr, beta), in order
    assert by["dpo"] == [{"train.optim.lr": lr, "base_kwargs.beta": b} for lr in (1e-4, 3e-4) for b in (0.1, 0.3)]
    # KLDPO: 4 of its 2 x 2 x 3 grid with its own knob on top, distinct, seeded (the same every call)
    assert len({json.dumps(c, sort_keys=True) for c in by["kldpo"]}) == 4
    assert all(set(c) == {"train.optim.lr", "base_kwargs.beta", "weighting_kwargs.tau"} for c in by["kldpo"])
    assert by["kldpo"] == tuning.method_candidates(cfg, cfg.methods[1])
    assert by["kldpo"] != tuning.method_candidates(_cfg("tuning.seed=1"), cfg.methods[1])
    # RRHF has no beta: the shared beta is left out for it, its own knob takes its place
    assert all(set(c) == {"train.optim.lr", "base_kwargs.sft_weight"} for c in by["rrhf"])
    c2, m2 = tuning.apply_candidate(cfg, cfg.methods[1], by["kldpo"][0])
    assert c2.train.optim.lr == by["kldpo"][0]["train.optim.lr"] and cfg.train.optim.lr == 1e-4
    assert m2.weighting_kwargs["tau"] == by["kldpo"][0]["weighting_kwargs.tau"] and "tau" not in cfg.methods[1].weighting_kwargs
    # a YAML '1e-4' (a string) becomes the field's float
    c3, _ = tuning.apply_candidate(cfg, cfg.methods[0], {"train.optim.lr": "1e-4"})
    assert c3.train.optim.lr == 1e-4


@pytest.mark.parametrize("override, match", [
    ("tuning.budget=5", r"'tuning.budget' is 5 but method 'dpo' \('methods.0'\) has only 4 configurations"),
    ("tuning.strategy=grid", r"with tuning.strategy=grid every method's grid must have exactly the budget"),
    ("tuning.method_grid.ipo={base_kwargs.beta: [0.1]}", r"'tuning.method_grid' names unknown method\(s\) \['ipo'\]"),
    ("tuning.grid.optim.lr=[0.1]", r"'tuning.grid.optim.lr': a grid key is"),
    ("tuning.grid.train.optim.b1=[0.9]", r"'tuning.grid.train.optim.b1': tunable train settings are"),
    ("tuning.grid.train.optim.lr=[]", r"'tuning.grid.train.optim.lr' must be a non-empty list"),
    ("tuning.grid.train.optim.lr=[0.0, 1.0e-4]", r"'tuning.grid.train.optim.lr' must list positive numbers"),
    ("tuning.method_grid.kldpo={weighting_kwargs.tau: [-1.0, 0.5]}",
     r"'tuning.method_grid.kldpo.weighting_kwargs.tau' \(kldpo\): 'tau' must be > 0; got -1.0"),
    ("tuning.method_grid.kldpo={weighting_kwargs.temp: [1.0]}",
     r"'tuning.method_grid.kldpo.weighting_kwargs.temp' \(kldpo\): .*unknown hyper-parameter"),
    ("tuning.metric=loss", r"'tuning.metric' must be one of \('pref_acc',\)"),
    ("tuning.val_fraction=1.0", r"'tuning.val_fraction' must be in \(0, 1\)"),
    ("tuning.baseline=ipo", r"'tuning.baseline' is 'ipo', not one of the methods"),
])
def test_tuning_section_errors_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(override)


def test_flr_and_preference_hf_refuse_tuning(tmp_path):
    from alignshift.experiment.driver import run_experiment
    from alignshift.experiment.preference_hf import PreferenceHFExperiment

    with pytest.raises(ConfigError, match="'tuning.enabled' is true, but PreferenceHFExperiment does not support"):
        run_experiment(_cfg(), str(tmp_path / "o"), PreferenceHFExperiment())


def test_split_indices_are_disjoint_seeded_and_sized():
    keep, held = tuning.split_indices(50, 0.2, seed=3, tuning_seed=0)
    assert len(held) == 10 and len(keep) == 40 and not set(keep) & set(held) and set(keep) | set(held) == set(range(50))
    k2, h2 = tuning.split_indices(50, 0.2, seed=3, tuning_seed=0)
    assert np.array_equal(held, h2) and not np.array_equal(held, tuning.split_indices(50, 0.2, seed=4, tuning_seed=0)[1])


def test_split_rebuilds_train_val_and_dora_splits_pairs_lists_and_columns():
    from alignshift.experiment.dora import DoraExperiment

    n = 20
    tr = {"chosen_input_ids": np.arange(n)[:, None], "w": np.arange(n, dtype=np.float32)}
    va = {"chosen_input_ids": np.arange(100, 104)[:, None], "w": np.zeros(4, np.float32)}
    cfg = _cfg("tuning.val_fraction=0.25")
    ctx = types.SimpleNamespace(cfg=cfg, seed=0, extra={},
                                sets={"train": tr, "val": va, "train+val": {}, "oracle": dict(tr)})
    info = tuning.split_for_tuning(ctx, ("train",))
    assert info == {"from": "train", "n_total": 20, "n_train": 15, "n_select": 5, "val_fraction": 0.25}
    ids = set(ctx.sets["train"]["chosen_input_ids"][:, 0]) | set(ctx.sets["tune_val"]["chosen_input_ids"][:, 0])
    assert ids == set(range(n)) and len(ctx.sets["oracle"]["w"]) == n  # the oracle set is not split
    np.testing.assert_array_equal(ctx.sets["train+val"]["chosen_input_ids"][:, 0],
                                  list(ctx.extra["train_keep"]) + [100, 101, 102, 103])
    lists = {"chosen_input_ids": np.arange(n)[:, None], "cand_scores": np.arange(n * 4).reshape(n, 4)}
    ctx = types.SimpleNamespace(cfg=cfg, seed=0, extra={"pair_cols": np.arange(n * 2).reshape(n, 2)},
                                sets={"pairs": dict(tr), "lists": lists})
    DoraExperiment().tuning_split(ctx)
    keep = ctx.extra["train_keep"]
    np.testing.assert_array_equal(ctx.sets["lists"]["cand_scores"][:, 0], keep * 4)
    np.testing.assert_array_equal(ctx.extra["pair_cols"][:, 0], keep * 2)
    assert len(ctx.sets["tune_val"]["w"]) == 5


def test_paired_differences_match_a_float64_t_interval():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.80, 0.02, 5), rng.normal(0.78, 0.02, 5)
    summaries = [{"seed": s, "methods": {"dpo": {"acc": float(b[s]), "kl": 1.0},
                                         "kldpo": {"acc": float(a[s]), "kl": float("nan")}}} for s in range(5)]
    p = paired_differences(summaries, "dpo", ["acc", "kl", "missing"])
    d = a - b
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / math.sqrt(5)
    r = p["methods"]["kldpo"]["acc"]
    assert r["mean"] == pytest.approx(d.mean(), rel=1e-12)
    assert r["ci95"] == pytest.approx([d.mean() - half, d.mean() + half], rel=1e-12)
    assert r["n_positive"] == int((d > 0).sum()) and r["n"] == 5
    assert "kl" not in p["methods"]["kldpo"] and "missing" not in p["methods"]["kldpo"]  # NaN / absent: left out
    assert p["baseline"] == "dpo" and p["n_seeds"] == 5 and list(p["methods"]) == ["kldpo"]
    assert t_interval([0.3]) == (0.3, None, None)  # one seed: no interval


def test_tiny_tuned_run_end_to_end(tmp_path):
    """--quick-sized: 1 seed, DPO and KLDPO with 2 configurations each (KLDPO's τ on top);
    the selected configuration is the best on the held-out training pairs, and summary.json /
    results.md carry the selections and the paired differences."""
    from alignshift.eval.shift_eval import preference_accuracy
    from alignshift.experiment.driver import Experiment, run_experiment
    from alignshift.experiment.evaluators import Evaluator

    class TestAccuracy(Evaluator):  # no sampling: the tuning machinery is what is tested here
        columns = [("deploy_pref_acc", "deploy pref. acc.")]

        def evaluate(self, ctx, objective, params):
            return {"deploy_pref_acc": preference_accuracy(ctx.logits_fn, params, ctx.sets["test"], objective)["pref_acc"]}

    cfg = load_config(DEMO, [
        "seeds=1", "data.scenario_kwargs={n_train: 48, n_test: 16, n_sft: 96}", "sft.steps=2", "sft.batch_size=16",
        "train.steps=2", "train.batch_size=8", "train.eval_every=0", "train.log_every=1",
        "methods=[{name: dpo, base: dpo}, {name: kldpo, base: dpo, weighting: kl_dro}]",
        "tuning={enabled: true, budget: 2, val_fraction: 0.25, grid: {train.optim.lr: [1.0e-4, 1.0e-2]}, "
        "method_grid: {kldpo: {weighting_kwargs.tau: [0.1, 1.0]}}}"])
    out = tmp_path / "out"
    s = run_experiment(cfg, str(out), Experiment(TestAccuracy()))
    seed = json.loads((out / "seed_0" / "summary.json").read_text())
    for name in ("dpo", "kldpo"):
        rec = seed["tuning"]["methods"][name]
        scores = [c["pref_acc"] for c in rec["candidates"]]
        assert len(scores) == 2 and rec["selected_index"] == int(np.argmax(scores)) and rec["score"] == max(scores)
        assert seed["methods"][name]["select_pref_acc"] == rec["score"]
        assert seed["methods"][name]["tuning_time_s"] >= seed["methods"][name]["train_time_s"] > 0
        assert s["tuning"]["methods"][name]["selected_by_seed"]["0"]["values"] == rec["selected"]
    assert set(seed["tuning"]["methods"]["kldpo"]["selected"]) == {"train.optim.lr", "weighting_kwargs.tau"}
    assert seed["tuning"]["split"] == {"from": "train", "n_total": 48, "n_train": 36, "n_select": 12, "val_fraction": 0.25}
    for key in ("scenario", "seed", "methods", "config", "n_seeds", "seeds", "wall_time_s"):  # the contract stays
        assert key in s
    p = s["paired_vs_dpo"]
    assert p["baseline"] == "dpo" and p["methods"]["kldpo"]["deploy_pref_acc"]["ci95"] is None  # one seed
    text = (out / "results.md").read_text()
    assert "### Tuning: 2 configurations per method (random)" in text
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["candidate"] for r in recs if r.get("phase") == "tuning"} == {0, 1}
    assert not [r for r in recs if r.get("phase") == "preference"]
