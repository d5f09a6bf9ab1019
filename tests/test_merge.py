"""``--merge``: seeds run by separate processes (``seed=S --seeds N``, one ``--out`` each) are
aggregated into the files one run over all the seeds writes. The real script (shift_demo.py) and
the real aggregation; training is replaced by a stub of the driver's ``run_seed`` (a seed's
training is what ``seed=S`` already runs alone: ``run_seed(cfg, seed)`` reads nothing else)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

from alignshift.config import to_dict
from alignshift.eval.report import write_json_atomic
from alignshift.experiment import driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "experiments", "configs", "shift_demo.yaml")
METHODS = "methods=[{name: dpo, base: dpo}, {name: kldpo, base: dpo, weighting: kl_dro}]"


def _load():
    spec = importlib.util.spec_from_file_location("shift_demo_merge", os.path.join(ROOT, "experiments", "shift_demo.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


demo = _load()


def _stub_run_seed(cfg, seed, out, writer, experiment):
    """A seed's summary as ``run_seed`` writes it; numbers a function of (seed, method, metric)."""
    cols = [k for k, _ in experiment.evaluator.columns]
    methods = {"reference (SFT)": {k: math.nan if k == "deploy_pref_acc" else 0.1 * seed for k in cols}}
    for i, m in enumerate(cfg.methods):
        methods[m.name] = {k: 0.5 + 0.01 * ((seed * 7 + i * 3 + j) % 11) for j, k in enumerate(cols)}
        for step in (1, 2):
            writer.write({"seed": seed, "phase": "preference", "method": m.name, "step": step, "loss": 0.7 - 0.1 * step})
    summary = {"scenario": cfg.data.scenario, "seed": seed, "methods": methods, "config": to_dict(cfg),
               "data_info": {"n_train": 400}, "wall_time_s": 10.0 + seed}
    write_json_atomic(os.path.join(out, f"seed_{seed}", "summary.json"), summary)
    return summary


def _run(out, *argv):
    """shift_demo.py --quick with ``argv`` (options, then overrides) and the two methods."""
    return demo.main(["--config", DEMO, "--out", str(out), "--quick", *argv, METHODS])


def _numbers(s):
    """The summary without what may differ (times, config, provenance), NaN-safe to compare."""
    s = {k: v for k, v in s.items() if k not in ("wall_time_s", "config", "merged_from")}
    return json.dumps(s, sort_keys=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("merge")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(driver, "run_seed", _stub_run_seed)
        whole = _run(d / "whole", "--seeds", "2")
        _run(d / "a", "--seeds", "1", "seed=0")
        _run(d / "b", "--seeds", "1", "seed=1")
    return d, whole



def test_merged_seeds_equal_one_run(runs):
    d, whole = runs
    merged = _run(d / "m", "--seeds", "2", "--merge", str(d / "a"), "--merge", str(d / "b"))
    assert merged["n_seeds"] == 2 and merged["seeds"] == [0, 1]
    assert _numbers(merged) == _numbers(whole)  # every method's mean ± s.e., paired_vs_dpo, ...
    assert merged["paired_vs_dpo"]["methods"]["kldpo"]["deploy_pref_acc"]["n"] == 2
    assert merged["config"] == whole["config"]  # the merged run's seeds, not a part's
    assert merged["merged_from"] == {str(d / "a"): [0], str(d / "b"): [1]}
    assert merged["wall_time_s"] == 21.0  # the seeds' own wall times, summed
    assert json.loads((d / "m" / "summary.json").read_text())["n_seeds"] == 2
    assert (d / "m" / "results.md").read_text() == (d / "whole" / "results.md").read_text()
    assert (d / "m" / "seed_1" / "summary.json").exists()
    recs = [json.loads(x) for x in (d / "m" / "metrics.jsonl").read_text().splitlines()]
    whole_recs = [json.loads(x) for x in (d / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert recs == whole_recs and {r["seed"] for r in recs} == {0, 1}


@pytest.mark.parametrize("argv, msg", [
    (["--seeds", "3"], "no finished seed_<s>/summary.json for seed(s) [2]"),
    (["--seeds", "2", "train.steps=3"], "was run with another config (differs in ['train'])"),
    (["--seeds", "2", "--resume"], "--merge and --resume"),
])
def test_merge_errors_name_the_problem(runs, argv, msg, capsys):
    d, _ = runs
    with pytest.raises(SystemExit) as e:
        _run(d / "bad", "--merge", str(d / "a"), "--merge", str(d / "b"), *argv)
    assert msg in f"{e.value.code} {capsys.readouterr().err}"
    assert not (d / "bad" / "summary.json").exists()


def test_merge_refuses_a_seed_run_twice_and_a_missing_dir(runs, capsys):
    d, _ = runs
    for argv, msg in ((["--merge", str(d / "whole"), "--merge", str(d / "b")], "seed 1 is in both"),
                      (["--merge", str(d / "nowhere")], "is not a directory")):
        with pytest.raises(SystemExit) as e:
            _run(d / "bad2", "--seeds", "2", *argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


def test_robust_dpo_refuses_merge(tmp_path, capsys):
    """Its α curves are built from the scenario's data during the run: --merge says so."""
    spec = importlib.util.spec_from_file_location("robust_merge", os.path.join(ROOT, "experiments", "robust_dpo.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.main(["--quick", "--out", str(tmp_path / "m"), "--merge", str(tmp_path)])
    assert e.value.code == 2 and "run all seeds in one process" in capsys.readouterr().err
