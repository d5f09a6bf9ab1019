"""Training steps, reference handling and bit-identical resume on a tiny benchmark."""

import dataclasses
import math

import jax
import numpy as np
import pytest

from alignshift.config import MethodConfig, load_config
from alignshift.data import BatchIterator, encode_pairs, make_scenario
from alignshift.train.checkpoint import Checkpointer
from alignshift.train.loop import train_loop
from alignshift.train.metrics import JsonlWriter
from alignshift.train.optim import make_optimizer
from alignshift.data.chat import LengthBucketIterator
from alignshift.train import phases
from alignshift.train.phases import build_policy, objective_for, precompute_reference_logps, run_sft
from alignshift.forward import make_logits_fn, split_model
from alignshift.train.steps import init_state, make_preference_step


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(None, [
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "sft.steps=30", "sft.batch_size=32", "train.batch_size=8",
        "train.steps=12", "train.log_every=1", "data.scenario_kwargs={n_train: 64, n_test: 16, n_sft: 128}",
    ])
    data = make_scenario("deploy_shift", seed=0, **cfg.data.scenario_kwargs)
    model = build_policy(cfg.model, data.tokenizer, seed=0)
    graphdef, _, rest = split_model(model)
    ref_params = run_sft(model, data.sft, data.tokenizer, cfg, seed=0)
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=cfg.data.max_prompt_len,
                          max_completion_len=cfg.data.max_completion_len)
    arrays = {k: v for k, v in arrays.items() if not k.startswith("prompt_")}
    arrays.update(precompute_reference_logps(make_logits_fn(graphdef, rest), ref_params, arrays))
    return cfg, data, graphdef, rest, ref_params, arrays


def _copy(tree):
    return jax.tree_util.tree_map(lambda x: x.copy(), tree)


def _run(cfg, graphdef, rest, ref_params, arrays, method, *, steps, precomputed=True, ckpt=None, writer=None,
         checkpoint_every=0):
    obj = objective_for(method)
    tx = make_optimizer(cfg.train.optim, steps)
    step = make_preference_step(graphdef, rest, tx, obj)
    keys = [k for k in arrays if (precomputed or not k.startswith("reference_"))]
    if "kl_completions" not in obj.requires:
        keys = [k for k in keys if not k.startswith(("kl_", "reference_kl"))]
    it = BatchIterator({k: arrays[k] for k in keys}, cfg.train.batch_size, seed=0)
    return train_loop(step, init_state(_copy(ref_params), tx), it, steps=steps, log_every=1,
                      step_args=(None if precomputed else ref_params,), checkpointer=ckpt,
                      checkpoint_every=checkpoint_every, writer=writer, progress=False)


def test_sft_learns(setup):
    cfg, data, *_ = setup
    # the SFT loss of the fixture's run is logged; rerun 30 steps and check it decreased
    model = build_policy(cfg.model, data.tokenizer, seed=1)
    records = []

    class W:
        path = None

        def write(self, r):
            records.append(r)

    run_sft(model, data.sft, data.tokenizer, cfg, seed=1, writer=W())
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert records[0]["loss"] < math.log(data.tokenizer.vocab_size) + 0.5


@pytest.mark.parametrize("precomputed", [True, False])
def test_first_dpo_step_loss_is_ln2(setup, precomputed):
    cfg, _, graphdef, rest, ref_params, arrays = setup
    _, hist = _run(cfg, graphdef, rest, ref_params, arrays, MethodConfig(), steps=1, precomputed=precomputed)
    assert hist[0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_precomputed_reference_equals_in_step_reference(setup):
    cfg, _, graphdef, rest, ref_params, arrays = setup
    _, a = _run(cfg, graphdef, rest, ref_params, arrays, MethodConfig(), steps=5, precomputed=True)
    _, b = _run(cfg, graphdef, rest, ref_params, arrays, MethodConfig(), steps=5, precomputed=False)
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4, atol=1e-6)
    assert a[-1]["loss"] < a[0]["loss"]


@pytest.mark.parametrize("base, weighting", [("dpo", "uniform"), ("ipo", "uniform"), ("simpo", "uniform"),
                                             ("kto", "uniform"), ("dpo", "wpo")])
def test_every_base_loss_trains(setup, base, weighting):
    cfg, _, graphdef, rest, ref_params, arrays = setup
    m = MethodConfig(name=base, base=base, weighting=weighting)
    _, hist = _run(cfg, graphdef, rest, ref_params, arrays, m, steps=12)
    if weighting == "wpo":
        assert 0.0 < hist[0]["weights/max"] <= 1.0  # raw, clipped policy-probability weights
    assert all(np.isfinite(r["loss"]) for r in hist)
    first, last = np.mean([r["loss"] for r in hist[:3]]), np.mean([r["loss"] for r in hist[-3:]])
    assert last < first


def test_resume_is_bit_identical(setup, tmp_path):
    cfg, _, graphdef, rest, ref_params, arrays = setup
    m = MethodConfig(name="kto", base="kto")  # KTO: exercises the extra mismatched-completion arrays
    _, full = _run(cfg, graphdef, rest, ref_params, arrays, m, steps=10)
    ckdir = str(tmp_path / "ck")
    # "crash" after step 6: a run of 6 steps whose schedule is that of a 10-step run
    obj = objective_for(m)
    tx = make_optimizer(cfg.train.optim, 10)
    step = make_preference_step(graphdef, rest, tx, obj)
    it = BatchIterator(arrays, cfg.train.batch_size, seed=0)
    ck = Checkpointer(ckdir)
    train_loop(step, init_state(_copy(ref_params), tx), it, steps=6, log_every=1, step_args=(None,),
               checkpointer=ck, checkpoint_every=3, progress=False)
    ck.close()
    ck2 = Checkpointer(ckdir)
    assert ck2.latest_step() == 6
    it2 = BatchIterator(arrays, cfg.train.batch_size, seed=0)
    _, resumed = train_loop(step, init_state(_copy(ref_params), tx), it2, steps=10, log_every=1,
                            step_args=(None,), checkpointer=ck2, progress=False)
    ck2.close()
    assert [r["step"] for r in resumed] == [7, 8, 9, 10]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full[6:]]  # bit-identical


def test_length_bucket_preference_run_trims_and_resumes_bit_identically(setup, tmp_path, monkeypatch):
    """``train.length_bucket`` through ``run_preference``: the step sees trimmed batches, the run
    trains, and a resume from a mid-run checkpoint reproduces the uninterrupted losses exactly."""
    cfg, _, graphdef, rest, ref_params, arrays = setup
    full_width = arrays["chosen_input_ids"].shape[1]  # 18 here; real lengths 11..15
    lb = dataclasses.replace(cfg.train, length_bucket=4, steps=10, log_every=1, eval_every=0, checkpoint_every=3)
    cfg_lb = dataclasses.replace(cfg, train=lb)
    m = MethodConfig()

    it = phases.preference_iterator(arrays, cfg.train.batch_size, seed=0, length_bucket=4)
    assert isinstance(it, LengthBucketIterator)
    for s in range(it.steps_per_epoch):
        b, idx = it.batch_at(s), it.indices_at(s)
        w = b["chosen_input_ids"].shape[1]
        assert w % 4 == 0 and w < full_width
        # only padding is cut: every real token of the batch is still there
        assert b["chosen_attention_mask"].sum() == arrays["chosen_attention_mask"][idx].sum()
    assert type(phases.preference_iterator(arrays, 8, seed=0)) is BatchIterator  # 0 = off

    widths = []
    make_step = phases.make_preference_step

    def spy(*a, **k):
        real = make_step(*a, **k)

        def step(state, batch, *args, **kw):
            widths.append({k: v.shape[1] for k, v in batch.items() if np.ndim(v) == 2})
            return real(state, batch, *args, **kw)
        return step

    monkeypatch.setattr(phases, "make_preference_step", spy)
    _, full = phases.run_preference(graphdef, rest, ref_params, arrays, m, cfg_lb, seed=0,
                                    checkpoint_dir=str(tmp_path / "full"))
    assert len(widths) == 10 and all(w < full_width for ws in widths for w in ws.values())
    assert len({ws["chosen_input_ids"] for ws in widths}) > 1  # several bucket widths were used
    losses = [r["loss"] for r in full]
    assert all(np.isfinite(losses)) and losses[0] == pytest.approx(math.log(2.0), abs=1e-6)
    assert np.mean(losses[-3:]) < np.mean(losses[:3])

    # "crash" during step 7 (after the step-6 checkpoint): an eval hook that raises
    class Crash(RuntimeError):
        pass

    calls = []

    def crash(state):
        calls.append(1)
        if len(calls) == 7:
            raise Crash
        return {}

    ckdir = str(tmp_path / "ck")
    cfg_crash = dataclasses.replace(cfg_lb, train=dataclasses.replace(lb, eval_every=1))
    with pytest.raises(Crash):
        phases.run_preference(graphdef, rest, ref_params, arrays, m, cfg_crash, seed=0, checkpoint_dir=ckdir,
                              eval_fn=crash)
    ck = Checkpointer(ckdir)
    assert ck.latest_step() == 6
    ck.close()
    # the checkpoint records the bucket: resuming it without bucketing is refused
    cfg_off = dataclasses.replace(cfg_lb, train=dataclasses.replace(lb, length_bucket=0))
    with pytest.raises(ValueError, match="length_bucket=4"):
        phases.run_preference(graphdef, rest, ref_params, arrays, m, cfg_off, seed=0, checkpoint_dir=ckdir)
    _, resumed = phases.run_preference(graphdef, rest, ref_params, arrays, m, cfg_lb, seed=0, checkpoint_dir=ckdir)
    assert [r["step"] for r in resumed] == [7, 8, 9, 10]
    assert [r["loss"] for r in resumed] == losses[6:]  # bit-identical


def test_jsonl_writer_and_nan_guard(setup, tmp_path):
    cfg, _, graphdef, rest, ref_params, arrays = setup
    path = tmp_path / "m.jsonl"
    with JsonlWriter(str(path), static={"method": "dpo"}) as w:
        _run(cfg, graphdef, rest, ref_params, arrays, MethodConfig(), steps=2, writer=w)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and '"method": "dpo"' in lines[0]
    bad = dict(arrays)
    bad["reference_chosen_logps"] = np.full_like(arrays["reference_chosen_logps"], np.nan)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        _run(cfg, graphdef, rest, ref_params, bad, MethodConfig(), steps=1)


def test_remat_with_in_step_reference():
    """Regression: with remat, the frozen reference forward inside the step used to fail
    (nnx.remat under value_and_grad); it now runs outside the differentiated function."""
    import optax

    cfg = load_config(None, ["model.remat=true", "model.hidden_size=32", "model.num_attention_heads=2",
                             "model.num_key_value_heads=1"])
    data = make_scenario("deploy_shift", seed=0, n_train=16, n_test=4, n_sft=8)
    g, p, r = split_model(build_policy(cfg.model, data.tokenizer, seed=0))
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=8, max_completion_len=10)
    arrays = {k: v for k, v in arrays.items() if k.split("_")[0] in ("chosen", "rejected")}
    tx = optax.sgd(0.1)
    step = make_preference_step(g, r, tx, objective_for(MethodConfig()))
    _, m = step(init_state(_copy(p), tx), BatchIterator(arrays, 4, seed=0).batch_at(0), p)
    assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
