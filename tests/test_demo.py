"""The demo end to end (--quick), its output files, and its CLI errors."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "shift_demo.py")


def _run(*args, timeout=600):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    proc = _run("--quick", "--out", str(out), "--methods", "dpo,ipo,simpo,kto")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_demo_writes_summary_in_design_schema(quick_run):
    out, proc = quick_run
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"scenario", "seed", "methods", "config"}
    assert s["scenario"] == "deploy_shift" and isinstance(s["seed"], int)
    assert set(s["methods"]) == {"reference (SFT)", "dpo", "ipo", "simpo", "kto"}
    for name, m in s["methods"].items():
        for k in ("deploy_pref_acc", "deploy_reward", "win_rate_vs_ref", "kl_to_ref"):
            assert isinstance(m[k], float), (name, k)
        if name != "reference (SFT)":
            assert 0.0 <= m["deploy_pref_acc"] <= 1.0 and 0.0 <= m["win_rate_vs_ref"] <= 1.0
    assert s["config"]["train"]["steps"] == 20  # --quick applied
    assert (out / "seed_0" / "summary.json").exists()
    assert "| method |" in proc.stdout and "| dpo |" in proc.stdout


def test_demo_writes_metrics_jsonl_and_plot(quick_run):
    out, _ = quick_run
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    phases = {r["phase"] for r in recs}
    assert phases == {"sft", "preference"}
    dpo = [r for r in recs if r["method"] == "dpo" and "loss" in r]
    assert [r["step"] for r in dpo] == [5, 10, 15, 20]
    assert any("eval/deploy_pref_acc" in r for r in recs)
    png = (out / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "results.md").read_text().startswith("## ShiftBench")


def test_demo_rejects_unknown_config_key(tmp_path):
    proc = _run("--quick", "--out", str(tmp_path), "train.lrr=1", timeout=120)
    assert proc.returncode == 2
    assert "unknown config key 'train.lrr'" in proc.stderr
    assert not (tmp_path / "summary.json").exists()


def test_demo_rejects_unknown_method(tmp_path):
    proc = _run("--quick", "--out", str(tmp_path), "--methods", "dpo,nope", timeout=120)
    assert proc.returncode == 2 and "unknown method(s) ['nope']" in proc.stderr


def test_iw_dpo_experiment_quick(tmp_path):
    """IW-DPO end to end: validation batches, D_v-only and oracle data, weights leave uniform."""
    script = os.path.join(ROOT, "experiments", "iw_dpo.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path), "--methods",
                           "dpo_val,iw_dpo_r,oracle", "methods.5.weighting_kwargs.warmup_examples=160"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert set(s["methods"]) == {"reference (SFT)", "dpo_val", "iw_dpo_r", "oracle"}
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    iw = [r for r in recs if r.get("method") == "iw_dpo_r" and "weights/ess" in r]
    assert iw[0]["weights/ess"] == 1.0 and min(r["weights/ess"] for r in iw) < 1.0  # warm-up, then KMM


def test_robust_dpo_experiment_quick(tmp_path):
    """preference_shift end to end: alpha curves in summary.json and the curve plot."""
    script = os.path.join(ROOT, "experiments", "robust_dpo.py")
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path), "--methods",
                           "dpo,kldpo_t0.05,wdpo_r0.1", "train.steps=10", "eval.n_prompts=32"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["scenario"] == "preference_shift"
    curves = s["curves"]
    assert curves["kinds"] == ["convex", "geometric"] and curves["alphas"][0] == 0.0 and curves["alphas"][-1] == 1.0
    for name in ("dpo", "kldpo_t0.05", "wdpo_r0.1"):
        acc = curves["methods"][name]["acc/convex"]
        assert len(acc) == len(curves["alphas"]) and all(0.0 <= a <= 1.0 for a in acc)
    assert all(v != v for v in curves["methods"]["reference (SFT)"]["acc/convex"])  # NaN: no implicit reward
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("penalty" in r for r in recs if r.get("method") == "wdpo_r0.1")
    assert (tmp_path / "alpha_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_reference_cache_is_reused_across_runs(tmp_path):
    """train.reference_cache_dir: the second identical run reads reference log-probs from disk."""
    cache = tmp_path / "cache"
    args = ["--quick", "--methods", "dpo", "train.steps=5", "sft.steps=10", "eval.n_prompts=16",
            f"train.reference_cache_dir={cache}"]
    first = _run(*args, "--out", str(tmp_path / "a"))
    assert first.returncode == 0, first.stderr[-3000:]
    entries = sorted(p.name for p in cache.iterdir())
    assert len([e for e in entries if e.endswith(".npz")]) == 2  # train and test sets
    mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    second = _run(*args, "--out", str(tmp_path / "b"))
    assert second.returncode == 0, second.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # hits: nothing rewritten
    a = json.loads((tmp_path / "a" / "summary.json").read_text())["methods"]["dpo"]
    b = json.loads((tmp_path / "b" / "summary.json").read_text())["methods"]["dpo"]
    assert a["deploy_pref_acc"] == b["deploy_pref_acc"] and a["kl_to_ref"] == b["kl_to_ref"]


def test_lora_preference_phase_via_config(tmp_path):
    """model.lora.enabled: adapters on the SFT model; step 1 is exactly ln 2 (policy = reference)."""
    import math

    proc = _run("--quick", "--methods", "dpo", "--out", str(tmp_path), "model.lora.enabled=true",
                "train.steps=4", "train.log_every=1", "train.eval_every=0", "sft.steps=10", "eval.n_prompts=16",
                "train.optim.lr=1e-2", "train.optim.warmup_steps=0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    dpo = [r for r in recs if r.get("method") == "dpo" and "loss" in r]
    assert dpo[0]["step"] == 1 and abs(dpo[0]["loss"] - math.log(2.0)) < 1e-6
    assert dpo[-1]["loss"] < dpo[0]["loss"]
