"""Reliability (issue 10): non-finite steps are not applied, counted, logged with their batch
indices and stop the run after K in a row with the batch on disk; checkpoints restore the
whole loop state (iterators, fault counters, pending log window); a SIGTERM saves and exits;
resume on the demo config is bit-identical; same seed + config -> identical metrics.jsonl;
bad configs / rows / model folders raise one clear error naming the key, file or row."""

from __future__ import annotations

import json
import math
import os
import signal
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignshift.config import ConfigError, OptimConfig, load_config
from alignshift.data import BatchIterator
from alignshift.train.checkpoint import CheckpointError, Checkpointer
from alignshift.train.faults import NonFiniteError, Preempted, load_batch_dump
from alignshift.train.loop import train_loop
from alignshift.train.metrics import JsonlWriter
from alignshift.train.optim import SkipNonFiniteState, make_optimizer, skip_nonfinite

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(ROOT, "experiments", "configs", "shift_demo.yaml")


def _strip(records):
    """Records without their wall-clock field (``time_s``), the only non-deterministic one."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def _tree_equal(a, b) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))


# ------------------------------------------------------------------ a toy model for the loop
_X = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
_Y = (_X @ np.array([1.0, -2.0, 0.5, 3.0], np.float32)).astype(np.float32)


def _toy(total_steps=50, y=_Y, seed=0, batch=8):
    tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2), total_steps)

    @partial(jax.jit, donate_argnums=0)
    def step(state, b):
        loss, g = jax.value_and_grad(lambda w: jnp.mean((b["x"] @ w - b["y"]) ** 2))(state["params"])
        upd, opt = tx.update(g, state["opt_state"], state["params"], value=loss)
        new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], upd), "opt_state": opt}
        return new, {"loss": loss, "grad_norm": optax.tree.norm(g)}

    w0 = jnp.zeros(4, jnp.float32)
    state = {"step": jnp.zeros((), jnp.int32), "params": w0, "opt_state": tx.init(w0)}
    return step, state, BatchIterator({"x": _X, "y": y}, batch, seed=seed)


# ------------------------------------------------------------------ the optimiser guard
def test_skip_nonfinite_guard():
    params = {"a": jnp.arange(3.0), "b": jnp.ones((2, 2))}
    bare = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0), 10, guard=False)
    tx = make_optimizer(OptimConfig(lr=0.1, warmup_steps=0), 10)
    st, st_bare = tx.init(params), bare.init(params)
    assert isinstance(st, SkipNonFiniteState)
    g = {"a": jnp.array([0.1, -0.2, 0.3]), "b": jnp.full((2, 2), 0.5)}
    upd = jax.jit(lambda g, s, p, v: tx.update(g, s, p, value=v))

    u, st1 = upd(g, st, params, jnp.float32(1.0))
    u_bare, _ = jax.jit(bare.update)(g, st_bare, params)  # both jitted: same XLA arithmetic
    assert _tree_equal(u, u_bare)  # finite: exactly the wrapped optimiser's update
    assert (int(st1.notfinite_count), int(st1.total_notfinite), bool(st1.last_finite)) == (0, 0, True)

    bad = {"a": jnp.array([0.1, jnp.nan, 0.3]), "b": jnp.full((2, 2), 0.5)}
    u, st2 = upd(bad, st1, params, jnp.float32(1.0))  # NaN gradient
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree_util.tree_leaves(u))
    assert _tree_equal(st2.inner_state, st1.inner_state)  # Adam moments and count untouched
    assert _tree_equal(optax.apply_updates(params, u), params)
    u, st3 = upd(g, st2, params, jnp.float32(jnp.inf))  # finite gradient but infinite loss
    assert _tree_equal(st3.inner_state, st1.inner_state)
    assert (int(st3.notfinite_count), int(st3.total_notfinite), bool(st3.last_finite)) == (2, 2, False)
    big = {"a": jnp.full((3,), 3e38), "b": jnp.full((2, 2), 3e38)}  # finite entries, overflowing norm
    _, st4 = upd(big, st3, params, jnp.float32(1.0))
    assert int(st4.notfinite_count) == 3
    _, st5 = upd(g, st4, params, jnp.float32(1.0))
    assert (int(st5.notfinite_count), int(st5.total_notfinite)) == (0, 3)
    # without the loss (e.g. a caller that does not pass value=) the gradient is still checked
    _, st6 = skip_nonfinite(optax.sgd(0.1)).update(bad, skip_nonfinite(optax.sgd(0.1)).init(params), params)
    assert int(st6.notfinite_count) == 1


# ------------------------------------------------------------------ fault accounting in the loop
def test_loop_skips_counts_and_logs_nonfinite_steps(tmp_path):
    y = _Y.copy()
    y[5] = np.nan  # every batch holding example 5 has a NaN loss
    step, state, it = _toy(y=y)
    with JsonlWriter(str(tmp_path / "m.jsonl")) as w:
        state, hist = train_loop(step, state, it, steps=24, log_every=4, writer=w, progress=False)
    events = [r for r in hist if r.get("event") == "nonfinite_step"]
    expected = [s for s in range(1, 25) if 5 in it.indices_at(s - 1)]
    assert [e["step"] for e in events] == expected and len(expected) == 3  # 3 epochs of 8 batches
    for e in events:
        assert e["batch_indices"] == it.indices_at(e["step"] - 1).tolist() and 5 in e["batch_indices"]
        assert e["loss"] != e["loss"]  # NaN
    logged = [r for r in hist if "event" not in r]
    assert all(math.isfinite(r["loss"]) for r in logged)
    assert sum(r.get("nonfinite_steps", 0) for r in logged) == 3
    assert int(state["opt_state"].total_notfinite) == 3 and int(state["step"]) == 24
    assert all(np.isfinite(np.asarray(state["params"])))
    on_disk = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in on_disk if r.get("event")] == expected
    assert on_disk[[r.get("event") for r in on_disk].index("nonfinite_step")]["loss"] == "nan"


@pytest.mark.parametrize("log_every", [1, 4])
def test_loop_stops_after_k_consecutive_faults_and_dumps_the_batch(tmp_path, log_every):
    y = _Y.copy()
    step, state, it = _toy(y=y)
    order = np.concatenate([it.indices_at(s) for s in range(8)])
    y[order[16:]] = np.inf  # steps 3.. (batches 2..7 of epoch 0) all non-finite
    step, state, it = _toy(y=y)
    with pytest.raises(NonFiniteError, match=r"3 consecutive steps \[3, 4, 5\]") as ei:
        train_loop(step, state, it, steps=40, log_every=log_every, max_consecutive_nonfinite=3,
                   fault_dir=str(tmp_path), progress=False)
    path = ei.value.dump_path
    assert path == str(tmp_path / "nonfinite_batch_step5.npz") and str(path) in str(ei.value)
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]
    batch, info = load_batch_dump(path)
    ref = it.batch_at(4)
    np.testing.assert_array_equal(batch["x"], ref["x"])
    np.testing.assert_array_equal(batch["batch_indices"], it.indices_at(4))
    assert np.isinf(batch["y"]).all() and info["step"] == 5 and info["streak_steps"] == [3, 4, 5]


def test_run_where_every_step_is_nonfinite_raises_at_the_end():
    step, state, it = _toy(y=np.full_like(_Y, np.nan))
    with pytest.raises(NonFiniteError, match="every step"):
        train_loop(step, state, it, steps=2, log_every=1, progress=False)


# ------------------------------------------------------------------ checkpoints and preemption
def test_sigterm_in_process_saves_and_resume_restores_window_and_counters(tmp_path):
    """Preempted mid-window (step 7, log_every 3), with faults before: the resumed run logs the
    same records, bit for bit, as an uninterrupted one (fault counters and window restored)."""
    y = _Y.copy()
    y[5] = np.nan
    _, state, it = _toy(y=y)
    step_fn, state, it = _toy(y=y)

    def killer(state, batch):
        out = step_fn(state, batch)
        if it.step == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    ck = Checkpointer(str(tmp_path / "ck"))
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted) as ei:
        with JsonlWriter(str(tmp_path / "a.jsonl")) as w:
            train_loop(killer, state, it, steps=20, log_every=3, writer=w, checkpointer=ck, progress=False)
    assert ei.value.code == 143 and ei.value.step == 7 and ei.value.checkpoint_saved
    assert signal.getsignal(signal.SIGTERM) is previous  # handler restored
    assert ck.latest_step() == 7
    _, meta = ck.restore(_toy(y=y)[1])
    assert [w_["step"] for w_ in meta["window"]] == [7] and meta["faults"]["total"] >= 1

    step_fn, state, it = _toy(y=y)
    with JsonlWriter(str(tmp_path / "a.jsonl")) as w:
        train_loop(step_fn, state, it, steps=20, log_every=3, writer=w, checkpointer=ck, progress=False)
    step_fn, state, it = _toy(y=y)
    with JsonlWriter(str(tmp_path / "b.jsonl")) as w:
        train_loop(step_fn, state, it, steps=20, log_every=3, writer=w, progress=False)
    a = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert any(r.get("event") for r in b) and _strip(a) == _strip(b)

    # resuming with another data order is refused, naming what differs
    step_fn, state, it = _toy(y=y, seed=3)
    with pytest.raises(ValueError, match=r"seed=0 but this run's has 3"):
        train_loop(step_fn, state, it, steps=30, checkpointer=ck, progress=False)
    # a checkpoint that does not fit the state: one error naming directory and step
    with pytest.raises(CheckpointError, match=r"step 20 does not match"):
        ck.restore({"step": jnp.zeros((), jnp.int32), "params": jnp.zeros(7), "opt_state": state["opt_state"]})
    ck.close()


# ------------------------------------------------------------------ the real preference step
@pytest.fixture(scope="module")
def demo_cfg():
    """The demo config (experiments/configs/shift_demo.yaml, --quick), shortened further."""
    return load_config(DEMO_CONFIG, [
        "data.scenario_kwargs={n_train: 96, n_test: 16, n_sft: 96}", "sft.steps=8", "sft.batch_size=16",
        "train.steps=10", "train.batch_size=8", "train.log_every=3", "train.eval_every=4", "eval.n_prompts=8",
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
    ], quick=True)


# ------------------------------------------------------------------ demo: resume and determinism
@pytest.fixture(scope="module")
def demo_runs(demo_cfg, tmp_path_factory):
    """The demo pipeline blocks: SFT and reference log-probs once (``prepare_seed``), then DPO
    with held-out eval trained twice from scratch with the same seed and config into two
    output directories (each builds and compiles its own step); the second run is preempted by
    SIGTERM at step 5 (mid log-window) and resumed. Returns both runs' preference records
    (as written to metrics.jsonl), final params and the context."""
    import dataclasses

    from alignshift.experiment.driver import Experiment, prepare_seed, train_method
    from alignshift.experiment.evaluators import DeployEvaluator
    from alignshift.train import phases

    cfg = demo_cfg
    method = cfg.methods[0]
    assert method.name == "dpo"
    real = phases.make_preference_step
    mp = pytest.MonkeyPatch()
    out_a, out_b = tmp_path_factory.mktemp("run_a"), tmp_path_factory.mktemp("run_b")
    wa = JsonlWriter(str(out_a / "metrics.jsonl"), static={"scenario": cfg.data.scenario})
    ctx = prepare_seed(cfg, cfg.seed, str(out_a), wa)
    ev = DeployEvaluator()
    run_of = Experiment(ev).method_run

    def run(ctx, out, kill_at=None):
        if kill_at is not None:
            def make(*a, **k):
                step = real(*a, **k)
                calls = []

                def killer(*args, **kw):
                    out = step(*args, **kw)
                    calls.append(1)
                    if len(calls) == kill_at:
                        os.kill(os.getpid(), signal.SIGTERM)
                    return out
                return killer
            mp.setattr(phases, "make_preference_step", make)
            with pytest.raises(Preempted) as ei:
                train_method(ctx, run_of(ctx, method), eval_fn=ev.during_training(ctx, phases.objective_for(method)))
            assert ei.value.step == kill_at
            mp.setattr(phases, "make_preference_step", real)
        params, _ = train_method(ctx, run_of(ctx, method), eval_fn=ev.during_training(ctx, phases.objective_for(method)))
        ctx.writer.close()
        recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        return [r for r in recs if r.get("phase") == "preference"], recs, params

    try:
        a, all_a, pa = run(ctx, out_a)
        wb = JsonlWriter(str(out_b / "metrics.jsonl"), static={"scenario": cfg.data.scenario})
        ctx_b = dataclasses.replace(ctx, seed_dir=os.path.join(str(out_b), f"seed_{cfg.seed}"), writer=wb)
        b, _, pb = run(ctx_b, out_b, kill_at=5)
    finally:
        mp.undo()
    return a, b, pa, pb, ctx, all_a


def test_demo_resume_is_bit_identical_and_runs_are_deterministic(demo_runs):
    """Same seed + config -> identical metrics.jsonl records (all fields but the wall-clock
    ``time_s``), although run b was preempted at step 5 and resumed from its checkpoint."""
    a, b, pa, pb, _, all_a = demo_runs
    assert [r["step"] for r in a if "loss" in r] == [3, 6, 9, 10]
    assert [r["step"] for r in all_a if r.get("phase") == "sft"] == [3, 6, 8]
    assert any("eval/deploy_pref_acc" in r for r in a)
    assert _strip(a) == _strip(b)
    assert _tree_equal(pa, pb)  # final parameters bit-identical too


def test_preference_step_does_not_apply_nonfinite_steps(demo_runs):
    """The real jitted preference step (DPO, precomputed reference): a NaN reference gives NaN
    loss and gradient, a +inf one an infinite loss with a FINITE gradient (only the loss passed
    to the optimiser as ``value`` can tell); neither step changes params or Adam state."""
    from alignshift.train.phases import objective_for
    from alignshift.train.steps import init_state, make_preference_step

    ctx = demo_runs[-2]
    cfg, graphdef, rest, params = ctx.cfg, ctx.graphdef, ctx.rest, ctx.ref_params
    batch = {k: v[:4] for k, v in ctx.sets["train"].items() if k.split("_")[0] in ("chosen", "rejected")}
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0), 10)  # no warm-up: step 1 moves the params
    step = make_preference_step(graphdef, rest, tx, objective_for(cfg.methods[0]))
    ref = np.full((4,), -20.0, np.float32)
    state = init_state(jax.tree_util.tree_map(jnp.copy, params), tx)

    def run(state, rc):
        before = jax.device_get(state)
        new, m = step(state, {**batch, "reference_chosen_logps": rc, "reference_rejected_logps": ref})
        return before, jax.device_get(new), jax.device_get(m)

    for rc, what in ((np.where(np.arange(4) == 1, np.nan, -20.0), "NaN reference: NaN loss and gradient"),
                     (np.where(np.arange(4) == 2, np.inf, -20.0), "inf reference: inf loss, finite gradient")):
        before, state, m = run(state, rc.astype(np.float32))
        assert not np.isfinite(m["loss"]), what
        assert _tree_equal(state["params"], before["params"]), what
        assert _tree_equal(state["opt_state"].inner_state, before["opt_state"].inner_state), what
    assert np.isfinite(m["grad_norm"])  # the inf case: only the loss could tell
    assert int(state["opt_state"].total_notfinite) == 2 and int(state["step"]) == 2
    before, state, m = run(state, ref)
    assert np.isfinite(m["loss"]) and not _tree_equal(state["params"], before["params"])




# ------------------------------------------------------------------ input validation at the edges
@pytest.mark.parametrize("overrides, msg", [
    (["methods.0.base=simpo", "train.precompute_reference=true"],
     r"'train.precompute_reference' is true, but every method's base loss \['simpo'\] is reference-free"),
    (["methods.0.base=simpo", "train.reference_cache_dir=/tmp/x"], r"'train.reference_cache_dir' is set"),
    (["methods.0.weighting=iw_dpo_l", "data.scenario_kwargs={n_train: 64, n_val: 0}"],
     r"'methods.0.weighting' \(dpo\): 'iw_dpo_l' needs a deployment/validation set"),
    (["methods.0.train_data=val", "data.scenario_kwargs={n_val: 0}"], r"'methods.0.train_data'"),
    (["methods.0.base_kwargs.beta=abc"], r"'methods.0.base_kwargs.beta' must be float; got 'abc'"),
    (["methods.0.base_kwargs.beta=0"], r"'methods.0.base_kwargs.beta' must be > 0"),
    (["methods.0.base_kwargs.beta=.nan"], r"'methods.0.base_kwargs.beta' must be finite"),
    (["methods.0.weighting=kl_dro", "methods.0.weighting_kwargs.tau=-1"], r"'methods.0.weighting_kwargs.tau' must be > 0"),
    (["methods.0.weighting=kl_dro", "methods.0.weighting_kwargs.normalize=3"],
     r"'methods.0.weighting_kwargs.normalize' must be bool"),
    (["train.log_every=0"], r"'train.log_every' must be >= 1"),
    (["train.max_consecutive_nonfinite=0"], r"'train.max_consecutive_nonfinite' must be >= 1"),
    (["train.optim.b2=1.0"], r"'train.optim.b2' must be in \[0, 1\)"),
    (["train.optim.lr=.inf"], r"'train.optim.lr' must be finite"),
    (["data.truncation=cut"], r"'data.truncation' must be one of"),
    (["data.skip_bad_rows=maybe"], r"'data.skip_bad_rows' must be a bool"),
])
def test_impossible_or_mistyped_configs_name_the_key(overrides, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, overrides)


def test_valid_configs_still_load():
    load_config(DEMO_CONFIG)  # mixes dpo with reference-free simpo: fine
    cfg = load_config(None, ["methods.0.base=simpo", "train.precompute_reference=false"])
    assert cfg.train.max_consecutive_nonfinite == 10 and cfg.data.truncation == "truncate"
    assert load_config(None, ["methods.0.weighting=iw_dpo_l"]).methods[0].weighting == "iw_dpo_l"


def test_cli_skip_bad_rows_flag():
    from alignshift.cli import experiment_parser, parse_experiment_args

    p = experiment_parser("t", None, "out")
    _, cfg = parse_experiment_args(p, ["--skip-bad-rows"])
    assert cfg.data.skip_bad_rows is True
    _, cfg = parse_experiment_args(p, [])
    assert cfg.data.skip_bad_rows is False


@pytest.mark.parametrize("script", ["shift_demo", "iw_dpo", "robust_dpo", "dora"])
def test_benchmark_scripts_refuse_real_dataset_configs(script, capsys, monkeypatch):
    """A config with data.dataset given to a benchmark script is an error (exit 2) naming the
    key and the real-data script, not a silent benchmark run; --dry-run still plans it."""
    import importlib

    monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
    mod = importlib.import_module(script)
    real = os.path.join(ROOT, "experiments", "configs", "iw_dpo_safe_rlhf_llama3_8b.yaml")
    for argv in (["--config", real], ["--config", DEMO_CONFIG, "data.dataset=preference"]):
        with pytest.raises(SystemExit) as e:
            mod.main(argv + ["--out", "/nonexistent/never_written"])
        err = capsys.readouterr().err
        assert e.value.code == 2, err
        assert "config key 'data.dataset'" in err and "experiments/preference_hf.py" in err
    if script == "iw_dpo":  # planning is not running: the dry run accepts every per-paper config
        small = os.path.join(ROOT, "experiments", "configs", "kldpo_helpsteer2_llama32_1b.yaml")
        with pytest.raises(SystemExit) as e:
            mod.main(["--config", small, "--dry-run"])
        assert e.value.code == 0 and "sharding plan" in capsys.readouterr().out


def test_bad_rows_name_file_row_and_field_or_are_skipped_and_counted(tmp_path):
    from alignshift.data.schema import (DataError, SkippedRows, check_lengths, read_jsonl_rows,
                                        validate_examples)

    ok = {"prompt": "p", "chosen": "a", "rejected": "b"}
    f = tmp_path / "train.jsonl"
    lines = [json.dumps(ok).encode(), b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "b"}', b"",
             b"{not json", json.dumps([1]).encode(), json.dumps(ok).encode()]
    f.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match=rf"{f} line 2: not valid UTF-8 \(byte 0xe9 at column 31\)"):
        read_jsonl_rows(str(f))
    rep = SkippedRows()
    rows = read_jsonl_rows(str(f), skip_bad_rows=True, report=rep)
    assert len(rows) == 2 and rep.count == 3 and rep.by_source == {str(f): 3}
    assert "line 4: not valid JSON" in rep.summary() and "line 5: expected a JSON object" in rep.summary()

    bad = [ok, {**ok, "chosen": ""}, {**ok, "rejected": "a "}, {"prompt": "p", "chosen": "a"},
           {**ok, "prompt": b"\xff\xfe"}, {**ok, "chosen": "x\udce9y"}, {**ok, "chosen": b"ok bytes"}]
    for i, (row, m) in enumerate(zip(bad[1:], ["field 'chosen' is empty", "field 'rejected' is identical",
                                               "field 'rejected' is missing", "field 'prompt' is not valid UTF-8",
                                               "field 'chosen' is not valid UTF-8"]), start=1):
        with pytest.raises(DataError, match=rf"^data.jsonl row {i}: {m}"):
            validate_examples([ok] * i + [row], source="data.jsonl")
    rep = SkippedRows()
    kept = validate_examples(bad, source="data.jsonl", skip_bad_rows=True, report=rep)
    assert [e.chosen for e in kept] == ["a", "ok bytes"] and rep.count == 5

    count = lambda kind, text: len(text.split()) + 1  # noqa: E731  (bos / eos)
    exs = validate_examples([ok, {**ok, "chosen": "w " * 20}, {**ok, "prompt": "q " * 9}])
    assert len(check_lengths(exs, count, max_prompt_len=4, max_completion_len=5)) == 3  # truncate
    with pytest.raises(DataError, match=r"^t row 1: field 'chosen' has 21 tokens > max_completion_len=5"):
        check_lengths(exs, count, max_prompt_len=4, max_completion_len=5, policy="error", source="t")
    rep = SkippedRows()
    assert len(check_lengths(exs, count, max_prompt_len=4, max_completion_len=5, policy="skip", report=rep)) == 1
    assert rep.count == 2 and "field 'prompt' has 10 tokens > max_prompt_len=4" in rep.summary()


def test_pipeline_skips_bad_rows_only_when_asked(monkeypatch):
    import dataclasses

    from alignshift.data import make_scenario
    from alignshift.data.schema import DataError, PreferenceExample
    from alignshift.data.cleaning import clean_splits

    data = make_scenario("deploy_shift", seed=0, n_train=16, n_test=4, n_sft=8)
    train = list(data.train)
    train[3] = PreferenceExample(train[3].prompt, train[3].chosen, train[3].chosen)
    train[7] = {"prompt": "user: x", "chosen": "", "rejected": "b"}
    data = dataclasses.replace(data, train=train)
    cfg = load_config(None)
    with pytest.raises(DataError, match=r"^deploy_shift/train row 3: field 'rejected' is identical"):
        clean_splits(data, cfg.data, data.tokenizer, "deploy_shift")
    cfg = load_config(None, ["data.skip_bad_rows=true"])
    out = clean_splits(data, cfg.data, data.tokenizer, "deploy_shift")
    assert len(out.train) == 14 and out.info["skipped_rows"] == {"count": 2, "by_source": {"deploy_shift/train": 2}}
    cfg = load_config(None, ["data.truncation=error", "data.max_completion_len=3"])
    with pytest.raises(DataError, match=r"^deploy_shift/train row 0: field 'chosen' has \d+ tokens > max_completion_len=3"):
        clean_splits(out, cfg.data, data.tokenizer, "deploy_shift")
    cfg = load_config(None, ["data.truncation=error", "data.max_completion_len=3", "data.skip_bad_rows=true"])
    with pytest.raises(DataError, match=r"deploy_shift/train: no valid rows left"):  # all over-long: skipped
        clean_splits(out, cfg.data, data.tokenizer, "deploy_shift")


def test_model_folder_with_non_float_tensors_or_dtype_is_refused(tmp_path):
    from safetensors.numpy import save_file

    from alignshift.models.hf import load_hf_model

    cfg = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 1, "num_key_value_heads": 1}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    save_file({"model.embed_tokens.weight": np.zeros((8, 4), np.int8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.embed_tokens.weight' is stored as I8"):
        load_hf_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "dtype": "int4"}))
    with pytest.raises(ValueError, match=r"config.json: key 'dtype' is 'int4'"):
        load_hf_model(str(tmp_path))
    with pytest.raises(ValueError, match=r"dtype must be a floating-point dtype, got int32"):
        load_hf_model(str(tmp_path), dtype=jnp.int32)
