"""experiments/flr.py's command line: the shared experiment flags (alignshift.cli) on the
FLRExperimentConfig (with its ``flr:`` section), --dry-run, and the per-seed --resume. Nothing
is trained here: the driver's run_seed is replaced by a stub where main() runs."""

import importlib.util
import json
import os
import sys

import pytest

from alignshift.config import to_dict
from alignshift.eval.report import write_json_atomic
from alignshift.experiment import driver

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "experiments", "configs", "flr.yaml")


def _load():
    spec = importlib.util.spec_from_file_location("flr_experiment", os.path.join(ROOT, "experiments", "flr.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


flr_exp = _load()


def test_shared_flags_and_flr_section():
    args, cfg = flr_exp.parse_args(["--config", CONFIG, "--out", "o", "--quick", "--seeds", "2",
                                    "--skip-bad-rows", "flr.n_samples=3", "train.steps=7"])
    assert isinstance(cfg, flr_exp.FLRExperimentConfig)
    assert args.out == "o" and not args.resume
    assert cfg.seeds == 2 and cfg.data.skip_bad_rows
    assert cfg.flr.n_samples == 3 and cfg.flr.n_mine_prompts == 64  # override after --quick; quick applied
    assert cfg.train.steps == 7 and cfg.sft.steps == 60
    _, full = flr_exp.parse_args(["--config", CONFIG])
    assert full.flr.n_samples == 8 and full.flr.n_mine_prompts == 500 and full.seeds == 5


def test_methods_filter(tmp_path, capsys):
    cfg_path = tmp_path / "two.yaml"
    text = open(CONFIG).read().replace("  - {name: dpo, base: dpo, base_kwargs: {beta: 0.1}}",
                                       "  - {name: dpo, base: dpo, base_kwargs: {beta: 0.1}}\n"
                                       "  - {name: ipo, base: ipo, base_kwargs: {beta: 0.1}}")
    cfg_path.write_text(text)
    _, cfg = flr_exp.parse_args(["--config", str(cfg_path)])
    assert [m.name for m in cfg.methods] == ["dpo", "ipo"]
    _, cfg = flr_exp.parse_args(["--config", str(cfg_path), "--methods", "ipo"])
    assert [m.name for m in cfg.methods] == ["ipo"]
    with pytest.raises(SystemExit) as e:
        flr_exp.parse_args(["--config", str(cfg_path), "--methods", "dpo,nope"])
    assert e.value.code == 2 and "unknown method(s) ['nope']" in capsys.readouterr().err


@pytest.mark.parametrize("argv, msg", [
    (["flr.labelers=[flr,oracle]"], "flr.labelers: unknown ['oracle']"),
    (["data.scenario=deploy_shift"], "needs data.scenario=followup"),
    (["flr.n_sampels=3"], "flr.n_sampels"),
])
def test_config_errors_exit_2(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        flr_exp.parse_args(["--config", CONFIG, *argv])
    assert e.value.code == 2 and msg in capsys.readouterr().err


def test_dry_run(capsys):
    with pytest.raises(SystemExit) as e:
        flr_exp.parse_args(["--config", CONFIG, "--quick", "--dry-run", "flr.n_samples=3"])
    out = capsys.readouterr().out
    assert e.value.code == 0, out
    assert "not planned: ['flr']" in out


def _fake_run_seed(calls):
    def run_seed(cfg, seed, out, writer, experiment):
        calls.append(seed)
        writer.write({"seed": seed, "phase": "preference", "method": "dpo (FLR-mined)", "step": 5, "loss": 0.5})
        methods = {"SFT (reference)": {"quality": 0.1, "win_rate_vs_sft": 0.5}, "dpo (FLR-mined)":
                   {"quality": 0.2 + seed, "win_rate_vs_sft": 0.6}, "dpo (Direct-mined)": {"quality": 0.1 + seed / 2,
                                                                                            "win_rate_vs_sft": 0.5}}
        rm = {"FLR": {"pair_acc": 0.7, "pearson": 0.3, "spearman": 0.2}, "Direct": {"pair_acc": 0.5 + seed / 10,
                                                                                    "pearson": 0.1, "spearman": 0.1}}
        summary = {"scenario": "followup", "seed": seed, "methods": methods, "config": to_dict(cfg),
                   "timing": {"total_s": 1.0}, "mined_reward_correlation": {"flr": 0.4}, "reward_models": rm}
        write_json_atomic(os.path.join(out, f"seed_{seed}", "summary.json"), summary)
        return summary

    return run_seed


def _records(out):
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_resume_reuses_finished_seeds(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(driver, "run_seed", _fake_run_seed(calls))
    argv = ["--config", CONFIG, "--quick", "--seeds", "3", "--out", str(tmp_path)]
    first = flr_exp.main(argv)
    assert calls == [0, 1, 2] and first["n_seeds"] == 3
    # FLR's claim as paired differences vs Direct (seeds 0, 1, 2): reward models and policies
    rm = first["paired_vs_direct"]["reward_models"]["methods"]["FLR"]["pair_acc"]
    assert rm["mean"] == pytest.approx(0.7 - 0.6) and rm["n_positive"] == 2 and rm["ci95"][0] < 0.1 < rm["ci95"][1]
    pol = first["paired_vs_direct"]["alignment"]["dpo"]
    assert pol["baseline"] == "dpo (Direct-mined)" and list(pol["methods"]) == ["dpo (FLR-mined)", "dpo (GT-mined)"]
    assert pol["methods"]["dpo (FLR-mined)"]["quality"]["mean"] == pytest.approx(0.1 + 0.5)  # 0.1 + seed/2, mean seed 1
    assert "### Reward models minus Direct, paired by seed" in (tmp_path / "results.md").read_text()
    # seed 2 "was interrupted": no summary, a partial record left in metrics.jsonl
    os.remove(tmp_path / "seed_2" / "summary.json")
    calls.clear()
    again = flr_exp.main(argv + ["--resume"])
    assert calls == [2]
    assert [r["seed"] for r in _records(tmp_path)] == [0, 1, 2]  # seed 2's old record dropped, not duplicated
    assert again["methods"] == first["methods"] and again["reward_models"] == first["reward_models"]
    assert (tmp_path / "results.md").read_text().count("| Direct |") == 1
    # --seeds 4 --resume extends the run: the three finished seeds are reused (seeds/seed are
    # not part of what a seed's run depends on), only seed 3 runs
    calls.clear()
    more = flr_exp.main(["--config", CONFIG, "--quick", "--seeds", "4", "--out", str(tmp_path), "--resume"])
    assert calls == [3] and more["n_seeds"] == 4
    os.remove(tmp_path / "seed_3" / "summary.json")
    # without --resume every seed is rerun and metrics.jsonl starts afresh
    calls.clear()
    flr_exp.main(argv)
    assert calls == [0, 1, 2] and len(_records(tmp_path)) == 3


def test_resume_refuses_another_config(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(driver, "run_seed", _fake_run_seed([]))
    flr_exp.main(["--config", CONFIG, "--quick", "--seeds", "1", "--out", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        flr_exp.main(["--config", CONFIG, "--quick", "--seeds", "1", "--out", str(tmp_path), "--resume",
                      "flr.n_samples=2"])
    assert "different config" in str(e.value.code)
