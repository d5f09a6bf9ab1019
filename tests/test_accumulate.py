"""Gradient accumulation (alignshift/train/accumulate.py): a step over k micro-batches gives the
same loss, metrics and parameter update as one step over the whole batch, for every kind of
objective (sum-decomposable bases, each batch-coupled rule, KTO, a listwise base, WDPO), with
the reference precomputed or in the step; ``weighting_scope="micro_batch"`` equals running each
micro-batch as its own batch."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignshift.forward import split_model
from alignshift.losses import make_objective
from alignshift.losses.penalties import PenaltyGradient
from alignshift.models import LlamaConfig, LlamaForCausalLM
from alignshift.train.accumulate import merge_micro_batches, split_micro_batches, sum_decomposable
from alignshift.train.steps import init_state, make_preference_step

V, T, B, K = 23, 7, 8, 3
RTOL = 1e-5


def _rows(rng, n, lead=()):
    ids = rng.integers(1, V, (*lead, n, T)).astype(np.int32) if not lead else rng.integers(1, V, (n, *lead, T)).astype(np.int32)
    lengths = rng.integers(4, T + 1, ids.shape[:-1])
    am = (np.arange(T) < lengths[..., None]).astype(np.int32)
    lm = am.copy()
    lm[..., :2] = 0  # 2 prompt tokens
    return ids * am, am, lm


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    g, params, rest = split_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)  # a non-flat loss landscape
    ref_params = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    rng = np.random.default_rng(0)
    batch, val = {}, {}
    for grp in ("chosen", "rejected", "kl"):
        for target, n in ((batch, B), (val, 4)):
            ids, am, lm = _rows(rng, n)
            target.update({f"{grp}_input_ids": ids, f"{grp}_attention_mask": am, f"{grp}_loss_mask": lm})
    batch["source_prob"] = rng.uniform(0.05, 0.95, (B, 2)).astype(np.float32)
    batch["source_share"] = np.full((B, 2), 0.5, np.float32)
    batch["weight"] = rng.uniform(0.5, 1.5, B).astype(np.float32)
    lists = {}
    ids, am, lm = _rows(rng, B, lead=(K,))
    lists.update(cand_input_ids=ids, cand_attention_mask=am, cand_loss_mask=lm,
                 cand_scores=rng.normal(size=(B, K)).astype(np.float32))
    as_j = lambda d: {k: jnp.asarray(v) for k, v in d.items()}  # noqa: E731
    return g, params, rest, ref_params, as_j(batch), as_j(val), as_j(lists)


def _with_reference(g, rest, ref_params, batch, objective):
    """The batch with precomputed reference log-probs (the k = 1 in-step reference forward)."""
    from alignshift.forward import attach_reference, make_logits_fn

    return jax.jit(lambda b, r: attach_reference(make_logits_fn(g, rest), b, objective, r))(batch, ref_params)


_TX = optax.sgd(1.0)  # the update is -grad
_STEPS: dict = {}


def _step_fn(g, rest, objective, k, scope, gradient):
    """One jitted step per (objective, k, scope, gradient): calls with the same shapes reuse its
    compilation (the suite runs on 2 CPU cores)."""
    key = (id(g), objective.base, objective.weighting, repr(objective.weighting_kwargs), objective.penalty,
           repr(objective.penalty_kwargs), k, scope, gradient)
    if key not in _STEPS:
        _STEPS[key] = make_preference_step(g, rest, _TX, objective, grad_accum_steps=k, weighting_scope=scope,
                                           penalty_gradient=gradient)
    return _STEPS[key]


def _run(g, rest, params, objective, batch, *, k=1, scope="global", ref=None, val=None, step=0,
         gradient=None, frozen=None):
    tx = _TX
    fn = _step_fn(g, rest, objective, k, scope, gradient)
    state = init_state(jax.tree_util.tree_map(jnp.copy, params), tx)
    state["step"] = jnp.int32(step)
    new, metrics = fn(state, batch, ref, val, frozen)
    delta = jax.tree_util.tree_map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                                   new["params"], params)
    return {k_: float(v) for k_, v in metrics.items()}, delta


def _close(a, b, rtol=RTOL, what=""):
    ma, da = a
    mb, db = b
    assert set(ma) == set(mb), what
    for key in ma:
        np.testing.assert_allclose(ma[key], mb[key], rtol=rtol, atol=1e-7, err_msg=f"{what} metric {key}")
    flat_a = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(da)])
    flat_b = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(db)])
    scale = np.abs(flat_b).max()
    assert scale > 1e-6, f"{what}: the update is ~0, the comparison would be vacuous"
    np.testing.assert_allclose(flat_a, flat_b, rtol=0, atol=rtol * scale, err_msg=f"{what} update")


OBJECTIVES = {
    "dpo_data_weighted": (dict(base="dpo"), "pairs"),
    "wpo": (dict(base="dpo", weighting="wpo"), "pairs"),
    "kl_dro": (dict(base="dpo", weighting="kl_dro", weighting_kwargs={"tau": 0.5}), "pairs"),
    "kl_dro_normalized": (dict(base="dpo", weighting="kl_dro", weighting_kwargs={"tau": 0.5, "normalize": True}),
                          "pairs"),
    "dr_dpo": (dict(base="dpo", weighting="dr_dpo", weighting_kwargs={"beta_prime": 0.5}), "pairs"),
    "dora": (dict(base="dpo", weighting="dora", weighting_kwargs={"lam": 0.5}), "pairs"),
    "dro": (dict(base="dpo", weighting="dro", weighting_kwargs={"lam": 0.5}), "pairs"),
    # warm-up over the first 3 batches (B examples each); the tests run at step 3 (KMM active)
    "iw_dpo_l": (dict(base="dpo", weighting="iw_dpo_l", weighting_kwargs={"warmup_examples": 3 * B}), "pairs"),
    "kto": (dict(base="kto"), "pairs"),
    "pl_listwise": (dict(base="pl"), "lists"),
    "wdpo_squared": (dict(base="dpo", penalty="wdpo", penalty_kwargs={"rho": 0.5}), "pairs"),
    "wdpo_sqrt": (dict(base="dpo", penalty="wdpo", penalty_kwargs={"rho": 0.5, "penalty": "sqrt_mean"}), "pairs"),
}


def _setup(tiny, name, kto_positive_kl=True):
    g, params, rest, ref_params, batch, val, lists = tiny
    kw, layout = OBJECTIVES[name]
    obj = make_objective(**kw)
    data = lists if layout == "lists" else {k: v for k, v in batch.items()
                                           if name == "dpo_data_weighted" or k != "weight"}
    if "kl_completions" not in obj.requires:
        data = {k: v for k, v in data.items() if not k.startswith("kl_")}
    data = _with_reference(g, rest, ref_params, data, obj)
    if name == "kto" and kto_positive_kl:
        # make KTO's batch reference point z0 = max(mean KL, 0) positive (it is clamped to 0 for
        # these random models), so that it couples the batch
        data = {**data, "reference_kl_logps": data["reference_kl_logps"] - 30.0}
    v = _with_reference(g, rest, ref_params, {k: x for k, x in val.items() if not k.startswith("kl_")}, obj) \
        if "val_batch" in obj.requires else None
    return g, params, rest, obj, data, v


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_micro_batches_equal_the_whole_batch(tiny, name):
    g, params, rest, obj, data, val = _setup(tiny, name)
    whole = _run(g, rest, params, obj, data, val=val, step=3)
    for k in (2, 4):
        _close(_run(g, rest, params, obj, data, k=k, val=val, step=3), whole, what=f"{name} k={k}")
    assert sum_decomposable(obj) == (name in ("dpo_data_weighted", "wpo", "pl_listwise", "wdpo_squared"))


@pytest.mark.parametrize("name", ["dpo_data_weighted", "kto", "pl_listwise"])
def test_in_step_reference_accumulates(tiny, name):
    """The frozen reference runs forward per micro-batch inside the step: same as precomputed."""
    g, params, rest, obj, data, val = _setup(tiny, name, kto_positive_kl=False)
    ref_params = tiny[3]
    no_ref = {k: v for k, v in data.items() if not k.startswith("reference_")}
    _close(_run(g, rest, params, obj, no_ref, k=4, ref=ref_params, val=val, step=3),
           _run(g, rest, params, obj, data, val=val, step=3), what=name)


def test_first_order_wdpo_accumulates(tiny):
    """First-order penalty gradients run per micro-batch (the accumulation does not depend on
    the mode; forward-over-reverse is exact, so it is compared at the full tolerance)."""
    g, params, rest, obj, data, val = _setup(tiny, "wdpo_squared")
    grad = PenaltyGradient("forward_over_reverse")
    _close(_run(g, rest, params, obj, data, k=2, gradient=grad), _run(g, rest, params, obj, data, gradient=grad),
           what="forward_over_reverse")
    _, _, _, sqrt_obj, _, _ = _setup(tiny, "wdpo_sqrt")
    with pytest.raises(ValueError, match="weighting_scope 'micro_batch'"):
        _run(g, rest, params, sqrt_obj, data, k=2, gradient=grad)


@pytest.mark.parametrize("name", ["kl_dro", "kto", "iw_dpo_l", "wdpo_sqrt"])
def test_micro_batch_scope_is_each_micro_batch_as_its_own_batch(tiny, name):
    g, params, rest, obj, data, val = _setup(tiny, name)
    k, step = 2, 3
    micro = split_micro_batches(data, k)
    runs = [_run(g, rest, params, obj, {key: x[m] for key, x in micro.items()}, val=val, step=step * k + m)
            for m in range(k)]
    mean = ({key: np.mean([r[0][key] for r in runs]) for key in runs[0][0]},
            jax.tree_util.tree_map(lambda *d: np.mean(d, axis=0), *[r[1] for r in runs]))
    mean[0]["grad_norm"] = float(np.sqrt(sum(np.sum(x ** 2) for x in jax.tree_util.tree_leaves(mean[1]))))
    got = _run(g, rest, params, obj, data, k=k, scope="micro_batch", val=val, step=step)
    _close(got, mean, what=name)
    if not sum_decomposable(obj):  # and the scope matters: global differs
        glob = _run(g, rest, params, obj, data, k=k, val=val, step=step)
        d1 = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(got[1])])
        d2 = np.concatenate([x.ravel() for x in jax.tree_util.tree_leaves(glob[1])])
        assert np.abs(d1 - d2).max() > 1e-4 * np.abs(d2).max(), name


def test_iw_warmup_counts_examples(tiny):
    """IW-DPO's warm-up is counted in examples: global scope counts step·B, micro-batch scope
    step·B + m·B/k, as if every micro-batch were a step (warm-up: the first 3·B examples)."""
    g, params, rest, obj, data, val = _setup(tiny, "iw_dpo_l")
    # step 2: 16 examples seen < 24: uniform weights
    assert _run(g, rest, params, obj, data, k=2, val=val, step=2)[0]["weights/max"] == pytest.approx(1.0)
    assert _run(g, rest, params, obj, data, k=2, val=val, step=3)[0]["weights/max"] > 1.0 + 1e-4
    # micro-batch scope, step 2: micro-batches 4 and 5 of 4 examples: 16 and 20 seen < 24
    assert _run(g, rest, params, obj, data, k=2, scope="micro_batch", val=val,
                step=2)[0]["weights/max"] == pytest.approx(1.0)
    # step 3: micro-batches 6 and 7: 24 and 28 seen: KMM weights in both
    assert _run(g, rest, params, obj, data, k=2, scope="micro_batch", val=val, step=3)[0]["weights/min"] < 1.0 - 1e-4


def test_split_is_interleaved_and_merge_inverts_it():
    x = jnp.arange(24).reshape(12, 2)
    s = split_micro_batches({"x": x}, 3)["x"]
    assert s.shape == (3, 4, 2)
    np.testing.assert_array_equal(np.asarray(s[1][:, 0]), [2, 8, 14, 20])  # rows 1, 4, 7, 10
    np.testing.assert_array_equal(np.asarray(merge_micro_batches(s)), np.asarray(x))
    with pytest.raises(ValueError, match=r"batch\['y'\] has leading size 10, which is not divisible by 4"):
        split_micro_batches({"y": jnp.zeros((10, 3))}, 4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="grad_accum_steps must be >= 1"):
        make_preference_step(None, None, optax.sgd(1.0), make_objective("dpo"), grad_accum_steps=0)
    with pytest.raises(ValueError, match="weighting_scope must be one of"):
        make_preference_step(None, None, optax.sgd(1.0), make_objective("dpo"), grad_accum_steps=2,
                             weighting_scope="batch")


def test_lora_with_frozen_base_accumulates(tiny):
    """LoRA: adapters trained, the frozen base passed as ``frozen=``, the reference = zeroed
    adapters run in the step per micro-batch; a batch-coupled rule (DR-DPO)."""
    from alignshift.models.lora import LoRAConfig, apply_lora, reference_params, split_lora

    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = apply_lora(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)), LoRAConfig(rank=2, alpha=4.0), rngs=nnx.Rngs(1))
    g, lora, rest = split_lora(model)
    lora = jax.tree_util.tree_map(lambda x: x + 0.3, lora)  # adapters away from zero: the policy differs from the reference
    obj = make_objective("dpo", "dr_dpo", weighting_kwargs={"beta_prime": 0.5})
    data = {k: v for k, v in tiny[4].items() if k.startswith(("chosen_", "rejected_"))}
    ref = reference_params(lora)
    whole = _run(g, rest, lora, obj, data, ref=ref, frozen=rest)
    _close(_run(g, rest, lora, obj, data, k=4, ref=ref, frozen=rest), whole, what="lora dr_dpo")


def test_wdpo_refuses_packed_batches():
    from alignshift.train.penalty import penalty_terms

    obj = make_objective("dpo", penalty="wdpo")
    with pytest.raises(ValueError, match="not supported with packed or shared-prompt batches"):
        penalty_terms(None, None, None, {"packed_input_ids": jnp.zeros((2, 4), jnp.int32)}, obj, None)
