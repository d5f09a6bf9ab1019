"""Sharded training on a ("data", "fsdp", "tensor") mesh equals the single-device path.

The mesh checks need 8 devices, and the pytest process has already initialised JAX with one,
so they run once in a subprocess (this file run as a script with
``XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu``) that writes a JSON
report; the tests below assert on it. Rule-table and environment checks run in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback

import pytest

from alignshift.parallel.distributed import maybe_initialize_distributed, multi_process_env
from alignshift.parallel.mesh import resolve_mesh_shape
from alignshift.parallel.rules import LOGICAL_TO_MESH, logical_axes_for, logical_to_spec, unmatched_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_DEV = 8


# --------------------------------------------------------------------------- worker (subprocess)


def _worker(out_path: str) -> None:
    import math
    import tempfile

    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from alignshift.config import MethodConfig, OptimConfig, load_config
    from alignshift.data import encode_pairs, make_scenario
    from alignshift.parallel import (
        abstract_state,
        make_mesh,
        make_sharded_step,
        param_path,
        place_state,
        shard_batch,
        shard_params,
        state_shardings,
    )
    from alignshift.train.checkpoint import Checkpointer
    from alignshift.train.optim import make_optimizer
    from alignshift.train.phases import build_policy, objective_for, precompute_reference_logps
    from alignshift.forward import make_logits_fn, split_model
    from alignshift.train.steps import init_state, make_preference_step

    report: dict = {"n_devices": jax.device_count(), "checks": {}}

    def check(name):
        def deco(fn):
            try:
                fn()
                report["checks"][name] = "ok"
            except Exception:  # recorded, asserted on by the pytest side
                report["checks"][name] = traceback.format_exc()
            return fn

        return deco

    cfg = load_config(None, [
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.num_hidden_layers=2",
        "data.scenario_kwargs={n_train: 16, n_test: 8, n_sft: 8}",
    ])
    data = make_scenario("deploy_shift", seed=0, **cfg.data.scenario_kwargs)
    model = build_policy(cfg.model, data.tokenizer, seed=0)
    graphdef, params, rest = split_model(model)
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=cfg.data.max_prompt_len,
                          max_completion_len=cfg.data.max_completion_len)
    keys = [k for k in arrays if k.startswith(("chosen_", "rejected_"))]
    batches = [{k: arrays[k][i * 8:(i + 1) * 8] for k in keys} for i in range(2)]  # 8 pairs each
    report["vocab_size"] = int(data.tokenizer.vocab_size)

    # constant-ish lr from step 1 (no warm-up), so step 2 moves away from ln 2
    # Adam eps 1e-4, not 1e-8: with a tiny eps Adam's update is ~lr·sign(g), so float-rounding
    # differences between sharded and single-device reductions on near-zero gradient entries
    # become O(lr) parameter differences that say nothing about sharding correctness.
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.01, eps=1e-4), 10)
    step = make_preference_step(graphdef, rest, tx, objective_for(MethodConfig()))
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)

    # ---- single device (reference forward inside the step)
    dev0 = jax.devices()[0]
    ref1 = jax.device_put(params, dev0)
    s1 = jax.device_put(init_state(copy(params), tx), dev0)
    m1 = []
    for b in batches:
        s1, m = step(s1, b, ref1)
        m1.append({k: float(v) for k, v in m.items()})
    s1 = jax.device_get(s1)

    # ---- mesh (data=2, fsdp=2, tensor=2)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    report["mesh_shape"] = dict(mesh.shape)
    st = place_state(init_state(copy(params), tx), mesh)
    ref = shard_params(params, mesh)
    sstep = make_sharded_step(step, st, batches[0], mesh, ref)
    m2 = []
    for b in batches:
        st, m = sstep(st, shard_batch(b, mesh), ref)
        m2.append({k: float(v) for k, v in m.items()})
    report["losses_single"] = [m["loss"] for m in m1]
    report["losses_sharded"] = [m["loss"] for m in m2]
    report["grad_norm_single"] = [m["grad_norm"] for m in m1]
    report["grad_norm_sharded"] = [m["grad_norm"] for m in m2]
    report["specs"] = {param_path(p): str(s.spec) for p, s in
                       jax.tree_util.tree_leaves_with_path(state_shardings(st, mesh))}

    def leaves(t):
        return {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(t)}

    @check("sharded_equals_single")
    def _():
        assert math.isclose(m1[0]["loss"], math.log(2.0), rel_tol=1e-6)
        assert abs(m1[1]["loss"] - math.log(2.0)) > 1e-4, "step 2 did not move: weak test"
        np.testing.assert_allclose(report["losses_sharded"], report["losses_single"], rtol=1e-5, atol=0)
        np.testing.assert_allclose(report["grad_norm_sharded"], report["grad_norm_single"], rtol=1e-5)
        a, b = leaves(s1), leaves(st)
        assert a.keys() == b.keys()
        n_params = 0
        for k in a:
            if k.startswith("params/"):
                n_params += 1
                np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)
                moved = leaves(params)[k[len("params/"):]]
                assert not np.array_equal(a[k], moved) or "norm" in k, f"{k} did not change"
            else:  # optimizer moments: compare relative to their scale
                scale = float(np.max(np.abs(a[k]))) if a[k].size else 0.0
                np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-5 * scale + 1e-30, err_msg=k)
        assert n_params == len(leaves(params))

    @check("precomputed_reference_sharded")
    def _():
        # reference log-probs precomputed into the batch (1-D [B] columns, also split over
        # data*fsdp); host numpy batches go straight into the jitted step (jit places them)
        pre = precompute_reference_logps(make_logits_fn(graphdef, rest), params, arrays,
                                         groups=("chosen", "rejected"))
        pbatches = [dict(b, **{k: v[i * 8:(i + 1) * 8] for k, v in pre.items()}) for i, b in enumerate(batches)]
        s3 = place_state(init_state(copy(params), tx), mesh)
        pstep = make_sharded_step(step, s3, pbatches[0], mesh, None)
        losses = []
        for b in pbatches:
            s3, m = pstep(s3, b, None)
            losses.append(float(m["loss"]))
        report["losses_sharded_precomputed"] = losses
        np.testing.assert_allclose(losses, report["losses_single"], rtol=1e-4)
        r = s3["params"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
        assert r.sharding.spec == P("fsdp", "tensor"), r.sharding

    @check("state_shardings")
    def _():
        sh = state_shardings(st, mesh)
        # state actually lives where the rules say, outputs keep the input shardings
        for (p, x), (_, s) in zip(jax.tree_util.tree_leaves_with_path(st), jax.tree_util.tree_leaves_with_path(sh)):
            assert x.sharding.is_equivalent_to(s, x.ndim), (param_path(p), x.sharding, s)
        spec = report["specs"]
        q = "params/model/layers/0/self_attn/q_proj/kernel"
        assert spec[q] == str(P("fsdp", "tensor")), spec[q]
        assert spec["params/model/layers/0/self_attn/o_proj/kernel"] == str(P("tensor", "fsdp"))
        assert spec["params/model/layers/1/mlp/down_proj/kernel"] == str(P("tensor", "fsdp"))
        assert spec["params/model/norm/weight"] == str(P())
        assert spec["step"] == str(P())
        # optimizer moments follow their parameter; counts are replicated
        mu = [k for k in spec if k.startswith("opt_state/") and k.endswith("/mu/model/layers/0/self_attn/q_proj/kernel")]
        assert mu and all(spec[k] == spec[q] for k in mu), mu
        counts = [k for k in spec if k.endswith("/count")]
        assert counts and all(spec[k] == str(P()) for k in counts)
        # a vocab not divisible by tensor=2 falls back to replicated on that dim only
        V = report["vocab_size"]
        emb = spec["params/model/embed_tokens/embedding"]
        head = spec["params/lm_head/kernel"]
        if V % 2:
            assert emb == str(P(None, "fsdp")) and head == str(P("fsdp")), (V, emb, head)
        else:
            assert emb == str(P("tensor", "fsdp")) and head == str(P("fsdp", "tensor")), (V, emb, head)
        # extra step arguments: a flat batch dict (e.g. val_batch) is split like the batch,
        # a parameter tree (reference params) follows the rules
        from alignshift.parallel.rules import _extra_sharding

        vb = _extra_sharding(batches[0], mesh)
        assert vb["chosen_loss_mask"].spec == P(("data", "fsdp"))
        rs = jax.tree_util.tree_leaves(_extra_sharding(params, mesh)["model"]["layers"][0]["self_attn"]["q_proj"])[0]
        assert rs.spec == P("fsdp", "tensor") and _extra_sharding(None, mesh) is None
        # batch split over data*fsdp
        placed = shard_batch(batches[0], mesh)
        x = placed["chosen_input_ids"]
        assert x.sharding == NamedSharding(mesh, P(("data", "fsdp")))
        assert x.addressable_shards[0].data.shape[0] == 8 // 4

    @check("checkpoint_restore_other_mesh")
    def _():
        mesh2 = make_mesh(data=1, fsdp=4, tensor=2)
        with tempfile.TemporaryDirectory() as d:
            ck = Checkpointer(d)
            ck.save(2, st, {"step": 2})
            ck.close()
            ck = Checkpointer(d)
            restored, meta = ck.restore(abstract_state(st, mesh2))
            ck.close()
        assert meta["step"] == 2
        want = state_shardings(st, mesh2)
        for (p, x), (_, s), (_, y) in zip(jax.tree_util.tree_leaves_with_path(restored),
                                          jax.tree_util.tree_leaves_with_path(want),
                                          jax.tree_util.tree_leaves_with_path(st)):
            assert x.sharding.mesh.shape == mesh2.shape and x.sharding.spec == s.spec, (param_path(p), x.sharding)
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=param_path(p))
        q = restored["params"]["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
        assert q.addressable_shards[0].data.shape == (32 // 4, 32 // 2)
        # fsdp=4 for the embed dim: the restored state is really split 4 ways there
        report["restored_q_shard_shape"] = list(q.addressable_shards[0].data.shape)
        # training resumes on the new mesh: step 3 equals the single-device step 3
        s1_3, m1_3 = step(jax.device_put(s1, dev0), batches[0], ref1)
        ref2 = shard_params(params, mesh2)
        rstep = make_sharded_step(step, restored, batches[0], mesh2, ref2)
        r3, m2_3 = rstep(restored, batches[0], ref2)
        report["loss_step3_single"], report["loss_step3_resumed_other_mesh"] = float(m1_3["loss"]), float(m2_3["loss"])
        np.testing.assert_allclose(float(m2_3["loss"]), float(m1_3["loss"]), rtol=1e-5)
        a3, b3 = leaves(jax.device_get(s1_3["params"])), leaves(r3["params"])
        for k in a3:
            np.testing.assert_allclose(b3[k], a3[k], rtol=1e-5, atol=1e-7, err_msg=k)

    @check("lora_sharded")
    def _():
        # LoRA: adapters are the state (sharded like their base layers), the frozen base goes
        # in as the step's ``frozen`` argument (sharded by the rule table), reference = zeroed
        # adapters; two steps on the (2,2,2) mesh equal the single-device steps.
        from flax import nnx

        from alignshift.models.lora import LoRAConfig, apply_lora, reference_params, split_lora

        lmodel = build_policy(cfg.model, data.tokenizer, seed=0)
        apply_lora(lmodel, LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "v_proj", "o_proj", "up_proj",
                                                                   "down_proj")), rngs=nnx.Rngs(5))
        lg, lparams, lrest = split_lora(lmodel)
        lref = reference_params(lparams)
        lstep = make_preference_step(lg, lrest, tx, objective_for(MethodConfig()))
        a = jax.device_put(init_state(copy(lparams), tx), dev0)
        la = []
        for b in batches:
            a, m = lstep(a, b, lref, None, lrest)
            la.append(float(m["loss"]))
        sb = place_state(init_state(copy(lparams), tx), mesh)
        srest, sref = shard_params(lrest, mesh), shard_params(lref, mesh)
        lsstep = make_sharded_step(lstep, sb, batches[0], mesh, sref, None, srest)
        lb = []
        for b in batches:
            sb, m = lsstep(sb, shard_batch(b, mesh), sref, None, srest)
            lb.append(float(m["loss"]))
        report["lora_losses_single"], report["lora_losses_sharded"] = la, lb
        assert math.isclose(la[0], math.log(2.0), rel_tol=1e-6) and abs(la[1] - la[0]) > 1e-5, la
        np.testing.assert_allclose(lb, la, rtol=1e-5)
        q = sb["params"]["model"]["layers"][0]["self_attn"]["q_proj"]
        assert q["lora_a"][...].sharding.spec == P("fsdp"), q["lora_a"][...].sharding
        assert q["lora_b"][...].sharding.spec == P(None, "tensor"), q["lora_b"][...].sharding
        d = sb["params"]["model"]["layers"][0]["mlp"]["down_proj"]
        assert d["lora_a"][...].sharding.spec == P("tensor"), d["lora_a"][...].sharding
        assert d["lora_b"][...].sharding.spec == P(None, "fsdp"), d["lora_b"][...].sharding
        base_q = srest["model"]["layers"][0]["self_attn"]["q_proj"]["kernel"][...]
        assert base_q.sharding.spec == P("fsdp", "tensor"), base_q.sharding

    @check("accumulated_sharded")
    def _():
        # gradient accumulation on the mesh: 2 micro-batches of 4 (each spread over the 4 data
        # shards by the interleaved split) give the single-device whole-batch step, for a
        # sum-decomposable objective with the reference in the step, and for a batch-coupled rule
        for method in (MethodConfig(), MethodConfig(name="kldpo", weighting="kl_dro", weighting_kwargs={"tau": 0.5})):
            obj = objective_for(method)
            whole = make_preference_step(graphdef, rest, tx, obj)
            accum = make_preference_step(graphdef, rest, tx, obj, grad_accum_steps=2)
            sa = jax.device_put(init_state(copy(params), tx), dev0)
            sa, ma = whole(sa, batches[0], ref1)
            sa = jax.device_get(sa)
            sb = place_state(init_state(copy(params), tx), mesh)
            acc_step = make_sharded_step(accum, sb, batches[0], mesh, ref)
            sb, mb = acc_step(sb, shard_batch(batches[0], mesh), ref)
            for key in ("loss", "grad_norm", "rewards/accuracies", "weights/max"):
                np.testing.assert_allclose(float(mb[key]), float(ma[key]), rtol=1e-5, err_msg=f"{method.name} {key}")
            a, b = leaves(sa), leaves(sb)
            for key in a:
                if key.startswith("params/"):
                    np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-7, err_msg=f"{method.name} {key}")

    @check("mesh_shape_error")
    def _():
        try:
            make_mesh(data=3, fsdp=1, tensor=1)
        except ValueError as e:
            report["mesh_error"] = str(e)
        else:
            raise AssertionError("make_mesh(3, 1, 1) on 8 devices did not raise")
        try:
            make_mesh(data=-1, fsdp=3, tensor=1)
        except ValueError as e:
            report["mesh_error_rest"] = str(e)
        else:
            raise AssertionError("make_mesh(-1, 3, 1) on 8 devices did not raise")
        m = make_mesh(data=-1, fsdp=2, tensor=2)
        assert dict(m.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
        assert dict(make_mesh().shape) == {"data": 8, "fsdp": 1, "tensor": 1}

    @check("batch_error")
    def _():
        bad = {k: v[:6] for k, v in batches[0].items()}  # 6 rows on data*fsdp = 4
        try:
            shard_batch(bad, mesh)
        except ValueError as e:
            report["batch_error"] = str(e)
        else:
            raise AssertionError("a batch of 6 on data*fsdp=4 did not raise")
        try:
            make_sharded_step(step, st, bad, mesh, ref)
        except ValueError as e:
            report["batch_error_step"] = str(e)
        else:
            raise AssertionError("make_sharded_step accepted a batch of 6 on data*fsdp=4")

    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)


# --------------------------------------------------------------------------- pytest side


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("parallel") / "report.json"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={N_DEV}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not out.exists():
        pytest.fail(f"mesh worker failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


def _ok(report, name):
    res = report["checks"].get(name)
    assert res == "ok", f"{name} failed in the {N_DEV}-device worker:\n{res}"


def test_worker_sees_8_devices(report):
    assert report["n_devices"] == N_DEV
    assert report["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 2}


def test_sharded_dpo_steps_equal_single_device(report):
    _ok(report, "sharded_equals_single")


def test_gradient_accumulation_on_the_mesh_equals_the_whole_batch(report):
    _ok(report, "accumulated_sharded")


def test_sharded_step_with_precomputed_reference(report):
    _ok(report, "precomputed_reference_sharded")


def test_state_shardings_follow_rules(report):
    _ok(report, "state_shardings")


def test_lora_sharded_like_base_layers(report):
    _ok(report, "lora_sharded")


def test_checkpoint_restores_onto_another_mesh(report):
    _ok(report, "checkpoint_restore_other_mesh")
    assert report["restored_q_shard_shape"] == [8, 16]


def test_mesh_shape_error_is_clear(report):
    _ok(report, "mesh_shape_error")
    msg = report["mesh_error"]
    assert "data=3" in msg and "8" in msg, msg
    assert "fsdp=3" in report["mesh_error_rest"] and "8" in report["mesh_error_rest"]


def test_batch_not_divisible_error_is_clear(report):
    _ok(report, "batch_error")
    for msg in (report["batch_error"], report["batch_error_step"]):
        assert "chosen_input_ids" in msg and "6" in msg and "4" in msg, msg


# --------------------------------------------------------------------------- in-process


def test_resolve_mesh_shape():
    assert resolve_mesh_shape(8) == (8, 1, 1)
    assert resolve_mesh_shape(8, -1, 2, 2) == (2, 2, 2)
    assert resolve_mesh_shape(8, 2, -1, 1) == (2, 4, 1)
    with pytest.raises(ValueError, match=r"data=3.*device count 8"):
        resolve_mesh_shape(8, 3, 1, 1)
    with pytest.raises(ValueError, match="at most one"):
        resolve_mesh_shape(8, -1, -1, 1)


@pytest.mark.parametrize("path, ndim, axes", [
    # Llama / Gemma (HF names)
    ("model/embed_tokens/embedding", 2, ("vocab", "embed")),
    ("model/layers/0/self_attn/q_proj/kernel", 2, ("embed", "heads")),
    ("model/layers/0/self_attn/k_proj/kernel", 2, ("embed", "heads")),
    ("model/layers/0/self_attn/v_proj/bias", 1, ("heads",)),
    ("model/layers/0/self_attn/o_proj/kernel", 2, ("heads", "embed")),
    ("model/layers/0/mlp/gate_proj/kernel", 2, ("embed", "mlp")),
    ("model/layers/0/mlp/up_proj/kernel", 2, ("embed", "mlp")),
    ("model/layers/0/mlp/down_proj/kernel", 2, ("mlp", "embed")),
    ("model/layers/0/input_layernorm/weight", 1, (None,)),
    ("model/layers/0/post_feedforward_layernorm/weight", 1, (None,)),
    ("model/layers/0/self_attn/q_norm/weight", 1, (None,)),
    ("model/norm/weight", 1, (None,)),
    ("lm_head/kernel", 2, ("embed", "vocab")),
    # GPT-NeoX
    ("gpt_neox/embed_in/embedding", 2, ("vocab", "embed")),
    ("gpt_neox/layers/3/attention/query_key_value/kernel", 2, ("embed", "heads")),
    ("gpt_neox/layers/3/attention/query_key_value/bias", 1, ("heads",)),
    ("gpt_neox/layers/3/attention/dense/kernel", 2, ("heads", "embed")),
    ("gpt_neox/layers/3/attention/dense/bias", 1, (None,)),
    ("gpt_neox/layers/3/mlp/dense_h_to_4h/kernel", 2, ("embed", "mlp")),
    ("gpt_neox/layers/3/mlp/dense_h_to_4h/bias", 1, ("mlp",)),
    ("gpt_neox/layers/3/mlp/dense_4h_to_h/kernel", 2, ("mlp", "embed")),
    ("gpt_neox/layers/3/input_layernorm/bias", 1, (None,)),
    ("gpt_neox/final_layer_norm/scale", 1, (None,)),
    ("embed_out/kernel", 2, ("embed", "vocab")),
    # GPT-2
    ("transformer/wte/embedding", 2, ("vocab", "embed")),
    ("transformer/wpe/embedding", 2, (None, "embed")),
    ("transformer/h/0/attn/c_attn/kernel", 2, ("embed", "heads")),
    ("transformer/h/0/attn/c_attn/bias", 1, ("heads",)),
    ("transformer/h/0/attn/c_proj/kernel", 2, ("heads", "embed")),
    ("transformer/h/0/mlp/c_fc/weight", 2, ("embed", "mlp")),
    ("transformer/h/0/mlp/c_proj/kernel", 2, ("mlp", "embed")),
    ("transformer/h/0/mlp/c_proj/bias", 1, (None,)),
    ("transformer/h/0/ln_1/scale", 1, (None,)),
    ("transformer/ln_f/bias", 1, (None,)),
    # LoRA adapters follow their base layer (A: input dim, B: output dim, rank replicated)
    ("model/layers/0/self_attn/q_proj/lora_a", 2, ("embed", None)),
    ("model/layers/0/self_attn/q_proj/lora_b", 2, (None, "heads")),
    ("model/layers/0/self_attn/o_proj/lora_a", 2, ("heads", None)),
    ("model/layers/0/self_attn/o_proj/lora_b", 2, (None, "embed")),
    ("model/layers/0/mlp/up_proj/lora_b", 2, (None, "mlp")),
    ("model/layers/0/mlp/down_proj/lora_a", 2, ("mlp", None)),
    ("model/layers/0/mlp/down_proj/lora_b", 2, (None, "embed")),
    ("gpt_neox/layers/0/attention/query_key_value/lora_a", 2, ("embed", None)),
    ("transformer/h/0/mlp/c_proj/lora_a", 2, ("mlp", None)),
    # stacked (scanned) layers get a leading replicated dim; unknown names are replicated
    ("model/layers/self_attn/q_proj/kernel", 3, (None, "embed", "heads")),
    ("model/some_new_thing/kernel", 2, (None, None)),
])
def test_rule_table(path, ndim, axes):
    assert logical_axes_for(path, ndim) == axes


_TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                       num_hidden_layers=1, num_attention_heads=2, head_dim=16)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                              num_hidden_layers=1, num_attention_heads=2)),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=64, n_embd=32, n_layer=1, n_head=2)),
}


@pytest.mark.parametrize("arch", sorted(_TINY))
def test_every_model_parameter_matches_a_rule(arch):
    import importlib

    from flax import nnx

    cfg_name, model_name, kw = _TINY[arch]
    try:
        mod = importlib.import_module(f"alignshift.models.{arch}")
        cfg = getattr(mod, cfg_name)(**kw)
    except (ImportError, AttributeError, TypeError) as e:  # architecture not (yet) in this tree
        pytest.skip(f"{arch}: {e}")
    model = nnx.eval_shape(lambda: getattr(mod, model_name)(cfg, rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    assert unmatched_params(params) == []


def test_logical_to_mesh_and_divisibility_fallback():
    from jax.sharding import PartitionSpec as P

    assert LOGICAL_TO_MESH["vocab"] == LOGICAL_TO_MESH["heads"] == LOGICAL_TO_MESH["mlp"] == "tensor"
    assert LOGICAL_TO_MESH["embed"] == "fsdp"
    assert logical_to_spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert logical_to_spec((None,)) == P()

    class FakeMesh:  # only .shape is consulted
        shape = {"data": 2, "fsdp": 2, "tensor": 2}

    assert logical_to_spec(("vocab", "embed"), (90, 32), FakeMesh()) == P("tensor", "fsdp")
    assert logical_to_spec(("vocab", "embed"), (91, 32), FakeMesh()) == P(None, "fsdp")
    assert logical_to_spec(("embed", "vocab"), (33, 91), FakeMesh()) == P()
    # a mesh axis is never used twice in one spec
    assert logical_to_spec(("heads", "mlp"), (4, 4), FakeMesh()) == P("tensor")


def test_distributed_env_detection():
    assert multi_process_env({}) is None
    assert multi_process_env({"JAX_NUM_PROCESSES": "1"}) is None
    assert multi_process_env({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}) == "jax"
    assert multi_process_env({"JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "0"}) == "jax"
    assert multi_process_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}) is None
    assert multi_process_env({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) == "slurm"
    assert multi_process_env({"OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
    assert multi_process_env({"TPU_WORKER_HOSTNAMES": "a,b"}) == "tpu"
    assert multi_process_env({"TPU_WORKER_HOSTNAMES": "a"}) is None
    # explicit switch: JAX's own cluster detection (Cloud TPU pods), or forced off
    assert multi_process_env({"ALIGNSHIFT_DISTRIBUTED": "1"}) == "auto"
    assert multi_process_env({"ALIGNSHIFT_DISTRIBUTED": "0", "SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}) is None
    assert multi_process_env({"ALIGNSHIFT_DISTRIBUTED": "1", "OMPI_COMM_WORLD_SIZE": "2"}) == "ompi"
    with pytest.raises(ValueError, match="ALIGNSHIFT_DISTRIBUTED must be 1 or 0"):
        multi_process_env({"ALIGNSHIFT_DISTRIBUTED": "maybe"})
    # single process: a no-op, repeatable
    assert maybe_initialize_distributed({}) is False
    assert maybe_initialize_distributed({}) is False


if __name__ == "__main__":
    _worker(sys.argv[1])
