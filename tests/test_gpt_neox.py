"""GPT-NeoX / Pythia (Flax NNX) tests: parity with transformers, masking, jit/remat, HF weight mapping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models.gpt_neox import (
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
)
from alignshift.models.layers import LayerNorm

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 97
BASE = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4)  # head_dim 16

CASES = {
    # Pythia defaults: partial rotary 0.25 (4 of 16 dims), parallel residual, biases, untied
    "pythia_partial_parallel": dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    "partial_sequential": dict(rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                               use_parallel_residual=False),
    "full_rotary_tied_nobias_theta": dict(
        rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 1.0},
        tie_word_embeddings=True, attention_bias=False),
    "half_rotary_linear_scaling_gelu_new": dict(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5},
        hidden_act="gelu_new", use_parallel_residual=False),
}


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _hf_model(**overrides):
    kw = {**BASE, **{k: dict(v) if isinstance(v, dict) else v for k, v in overrides.items()}}
    cfg = transformers.GPTNeoXConfig(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.GPTNeoXForCausalLM(cfg).float().eval()
    # HF init (std 0.02, LayerNorm = (1, 0)) gives near-uniform attention and tiny logits;
    # use larger random weights and non-trivial LayerNorm affine parameters.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name or "layer_norm" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return cfg, hf


def _ours_from_hf(cfg, hf, **overrides):
    ours = GPTNeoXForCausalLM(GPTNeoXConfig.from_hf(cfg, **overrides), rngs=nnx.Rngs(0))
    return params_from_hf_state_dict(ours, hf.state_dict())


def _hf_logits(hf, ids, mask):
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos))
    return out.logits.float().numpy()


def _batch(seed=0, B=3, T=9):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, V, size=(B, T)).astype(np.int64)
    lens = np.array([T, 5, 2])[:B]
    right = (np.arange(T)[None] < lens[:, None]).astype(np.int64)
    left = right[:, ::-1].copy()
    return ids, right, left


@pytest.fixture(scope="module")
def base():
    cfg, hf = _hf_model(**CASES["pythia_partial_parallel"])
    return cfg, hf, _ours_from_hf(cfg, hf)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case):
    cfg, hf = _hf_model(**CASES[case])
    ours = _ours_from_hf(cfg, hf)
    ids, right, left = _batch()
    for mask in (right, left):
        ref = _hf_logits(hf, ids, mask)
        got = np.asarray(_fwd(ours, jnp.asarray(ids), jnp.asarray(mask)))
        assert got.dtype == np.float32 and got.shape == ref.shape
        real = mask.astype(bool)
        scale = max(1.0, np.abs(ref[real]).max())
        err = np.abs(got - ref)[real].max() / scale
        assert err < 1e-4, (case, err)
        assert np.abs(ref[real]).std() > 0.3  # non-trivial logits


def test_config_from_hf_spellings():
    # transformers-5 object
    hf = transformers.GPTNeoXConfig(**BASE, rope_parameters={"rope_theta": 500.0, "partial_rotary_factor": 0.5})
    ours = GPTNeoXConfig.from_hf(hf)
    assert ours.rope_theta == 500.0 and ours.partial_rotary_factor == 0.5 and ours.rope_scaling is None
    assert ours.head_dim == 16 and ours.rotary_ndims == 8
    assert ours.use_parallel_residual and not ours.tie_word_embeddings and ours.attention_bias
    # original config.json spelling (Pythia): rotary_pct / rotary_emb_base at top level
    old = {**BASE, "rotary_pct": 0.5, "rotary_emb_base": 500, "hidden_act": "gelu",
           "use_parallel_residual": True, "tie_word_embeddings": False}
    assert GPTNeoXConfig.from_hf(old) == ours
    # old transformers spelling: top-level rope_theta / partial_rotary_factor
    assert GPTNeoXConfig.from_hf({**BASE, "rope_theta": 500.0, "partial_rotary_factor": 0.5}) == ours
    # new dict spelling
    new = {**BASE, "rope_parameters": {"rope_theta": 500.0, "partial_rotary_factor": 0.5,
                                       "rope_type": "default"}}
    assert GPTNeoXConfig.from_hf(new) == ours
    # the default (Pythia) factor is 0.25
    assert GPTNeoXConfig.from_hf(BASE).partial_rotary_factor == 0.25
    lin = GPTNeoXConfig.from_hf({**BASE, "rope_parameters": {"rope_type": "linear", "factor": 2.0}})
    assert lin.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert GPTNeoXConfig.from_dict(ours.to_dict()) == ours
    assert hash(GPTNeoXConfig.from_dict(ours.to_dict())) == hash(ours)
    assert hash(ours) != hash(dataclasses.replace(ours, use_parallel_residual=False))
    with pytest.raises(NotImplementedError):
        GPTNeoXConfig(**BASE, hidden_act="mish")
    with pytest.raises(ValueError):
        GPTNeoXConfig(**BASE, partial_rotary_factor=0.1)  # 1.6 -> 1 rotary dim: odd


def test_layernorm_matches_torch():
    x = np.random.RandomState(0).randn(3, 5, 16).astype(np.float32) * 3 + 1
    ln = LayerNorm(16, eps=1e-5)
    w = np.random.RandomState(1).randn(16).astype(np.float32)
    b = np.random.RandomState(2).randn(16).astype(np.float32)
    ln.weight.set_value(jnp.asarray(w))
    ln.bias.set_value(jnp.asarray(b))
    ref = torch.nn.functional.layer_norm(torch.tensor(x), (16,), torch.tensor(w), torch.tensor(b), 1e-5)
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x))), ref.numpy(), atol=2e-6)


def test_state_dict_mapping_errors_and_roundtrip(base):
    cfg, hf, ours = base
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = params_to_hf_state_dict(ours)
    assert set(back) == set(sd)  # transformers-5 names, incl. lm_head.weight
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    # hub-checkpoint layout: embed_out.weight + legacy buffers
    hub = params_to_hf_state_dict(ours, head_name="embed_out")
    assert "embed_out.weight" in hub and "lm_head.weight" not in hub
    hub["gpt_neox.layers.0.attention.bias"] = np.tril(np.ones((4, 4), bool))
    hub["gpt_neox.layers.0.attention.masked_bias"] = np.array(-1e9, np.float32)
    hub["gpt_neox.layers.0.attention.rotary_emb.inv_freq"] = np.ones(2, np.float32)
    fresh = GPTNeoXForCausalLM(GPTNeoXConfig.from_hf(cfg), rngs=nnx.Rngs(1))
    params_from_hf_state_dict(fresh, hub)
    np.testing.assert_array_equal(np.asarray(fresh.embed_out.kernel[...]), sd["lm_head.weight"].T)
    ids, right, _ = _batch(6)
    np.testing.assert_array_equal(np.asarray(_fwd(fresh, jnp.asarray(ids), jnp.asarray(right))),
                                  np.asarray(_fwd(ours, jnp.asarray(ids), jnp.asarray(right))))

    bad = dict(sd)
    del bad["gpt_neox.layers.1.mlp.dense_h_to_4h.weight"]
    bad["gpt_neox.layers.1.mlp.extra.weight"] = np.zeros(3)
    with pytest.raises(KeyError) as ei:
        params_from_hf_state_dict(fresh, bad)
    assert "gpt_neox.layers.1.mlp.dense_h_to_4h.weight" in str(ei.value)
    assert "gpt_neox.layers.1.mlp.extra.weight" in str(ei.value)
    nohead = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    with pytest.raises(KeyError, match="embed_out.weight"):
        params_from_hf_state_dict(fresh, nohead)
    wrong = dict(sd)
    wrong["gpt_neox.final_layer_norm.bias"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="gpt_neox.final_layer_norm.bias"):
        params_from_hf_state_dict(fresh, wrong)
    # non-strict: partial load leaves the rest untouched
    params_from_hf_state_dict(fresh, {"gpt_neox.final_layer_norm.bias": np.zeros(64)}, strict=False)
    assert float(jnp.abs(fresh.gpt_neox.final_layer_norm.bias[...]).max()) == 0.0


def test_tied_state_dict_roundtrip():
    cfg, hf = _hf_model(**CASES["full_rotary_tied_nobias_theta"])
    ours = _ours_from_hf(cfg, hf)
    assert ours.embed_out is None
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = params_to_hf_state_dict(ours)
    assert set(back) == set(sd)
    np.testing.assert_array_equal(back["lm_head.weight"], sd["gpt_neox.embed_in.weight"])
    assert "lm_head.weight" not in params_to_hf_state_dict(ours, include_tied_head=False)
    assert "gpt_neox.layers.0.attention.dense.bias" not in back


def test_attribute_tree_mirrors_hf(base):
    _, _, m = base
    layer = m.gpt_neox.layers[1]
    assert isinstance(m.gpt_neox.layers, nnx.List)
    assert m.gpt_neox.embed_in.embedding.shape == (V, 64)
    assert layer.attention.query_key_value.kernel.shape == (64, 192)
    assert layer.attention.query_key_value.bias.shape == (192,)
    assert layer.attention.dense.kernel.shape == (64, 64)
    assert layer.mlp.dense_h_to_4h.kernel.shape == (64, 96)
    assert layer.mlp.dense_4h_to_h.kernel.shape == (96, 64)
    assert layer.input_layernorm.weight.shape == (64,) and layer.input_layernorm.bias.shape == (64,)
    assert m.gpt_neox.final_layer_norm.bias.shape == (64,)
    assert m.embed_out.kernel.shape == (64, V)
    assert m.config.rotary_ndims == 4


def test_causality(base):
    _, _, m = base
    ids, _, _ = _batch(1)
    a = np.asarray(_fwd(m, jnp.asarray(ids)))
    ids2 = ids.copy()
    ids2[:, 6] = (ids2[:, 6] + 1) % V
    b = np.asarray(_fwd(m, jnp.asarray(ids2)))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_padding_invariance(base):
    _, _, m = base
    ids, _, _ = _batch(2, T=6)
    ref = np.asarray(_fwd(m, jnp.asarray(ids)))
    ids_r = np.concatenate([ids, np.full((3, 4), 5)], axis=1)
    mask_r = np.concatenate([np.ones((3, 6), int), np.zeros((3, 4), int)], axis=1)
    out_r = np.asarray(_fwd(m, jnp.asarray(ids_r), jnp.asarray(mask_r)))
    np.testing.assert_allclose(out_r[:, :6], ref, atol=1e-4)
    ids_l = np.concatenate([np.full((3, 4), 7), ids], axis=1)
    mask_l = mask_r[:, ::-1].copy()
    out_l = np.asarray(_fwd(m, jnp.asarray(ids_l), jnp.asarray(mask_l)))
    np.testing.assert_allclose(out_l[:, 4:], ref, atol=1e-4)


def test_no_nan_with_fully_padded_rows(base):
    # (gradients with a fully padded row are checked in test_remat_same_logits_and_grads)
    _, _, m = base
    ids = jnp.array([[3, 4, 5, 6], [0, 0, 0, 0], [-1, -1, 9, 10]])
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]])
    out = _fwd(m, ids, mask)
    assert bool(jnp.all(jnp.isfinite(out)))


def test_jit_and_inputs_embeds(base):
    _, _, m = base
    ids, _, left = _batch(3)
    ids, left = jnp.asarray(ids), jnp.asarray(left)
    eager = _fwd(m, ids, left)  # input_ids path (jitted: op-by-op eager is slow on CPU)

    graphdef, state = nnx.split(m)
    pure = jax.jit(lambda st, e, mask: nnx.merge(graphdef, st)(inputs_embeds=e, attention_mask=mask))
    emb = m.embed(ids)
    assert emb.shape == (3, 9, 64)
    np.testing.assert_allclose(np.asarray(pure(state, emb, left)), np.asarray(eager), atol=1e-5)
    split = nnx.jit(lambda model, i, mk: model.logits_from_hidden(model.hidden_states(i, attention_mask=mk)))
    np.testing.assert_allclose(np.asarray(split(m, ids, left)), np.asarray(eager), atol=1e-5)
    with pytest.raises(ValueError):
        m(ids, inputs_embeds=emb)
    g = jax.jit(jax.grad(lambda e: jnp.sum(m(inputs_embeds=e, attention_mask=left)[:, -1, 0])))(emb)
    assert g.shape == emb.shape and bool(jnp.all(jnp.isfinite(g)))


def test_remat_same_logits_and_grads(base):
    cfg, hf, m = base
    m_remat = _ours_from_hf(cfg, hf, remat=True)
    assert m_remat.config.remat and not m.config.remat
    ids, _, left = _batch(4)
    left[1] = 0  # a fully padded row (and an out-of-range pad id) must not give NaN gradients
    ids[1, :3] = -1
    ids, left = jnp.asarray(ids), jnp.asarray(left)

    def loss(model):
        logits = model(ids, attention_mask=left)
        lp = jax.nn.log_softmax(logits, axis=-1)
        tgt = jnp.clip(ids, 0)[..., None]
        return -jnp.mean(jnp.take_along_axis(lp, tgt, -1)[..., 0] * left)

    def jaxpr_text(model):
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda st: loss(nnx.merge(graphdef, st)))(state))

    assert "remat" in jaxpr_text(m_remat) and "remat" not in jaxpr_text(m)
    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(m)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(m_remat)
    assert np.isfinite(float(l0))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g0))
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_bf16_compute_runs(base):
    cfg, hf, _ = base
    m16 = GPTNeoXForCausalLM(GPTNeoXConfig.from_hf(cfg), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    params_from_hf_state_dict(m16, hf.state_dict())
    assert m16.gpt_neox.layers[0].mlp.dense_h_to_4h.kernel.dtype == jnp.float32  # param_dtype
    ids, right, _ = _batch(5)
    out = _fwd(m16, jnp.asarray(ids), jnp.asarray(right))
    assert out.dtype == jnp.float32
    ref = _hf_logits(hf, ids, right)
    real = right.astype(bool)
    assert np.abs(np.asarray(out) - ref)[real].max() < 0.1 * np.abs(ref[real]).max()
