"""Llama (Flax NNX) tests: parity with transformers, masking, jit/remat, HF weight mapping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models.layers import positions_from_mask, rope_inv_freq
from alignshift.models.llama import (
    LlamaConfig,
    LlamaForCausalLM,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}

CASES = {
    "gqa": {},
    "mha_bias_headdim_theta": dict(num_key_value_heads=4, head_dim=16, attention_bias=True,
                                   mlp_bias=True, rope_theta=500.0),
    "mqa_tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "llama3_rope": dict(rope_scaling=LLAMA3),
}


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _hf_model(**overrides):
    # transformers mutates a passed rope_scaling dict in place (adds rope_theta): copy it
    kw = {**BASE, **{k: dict(v) if isinstance(v, dict) else v for k, v in overrides.items()}}
    cfg = transformers.LlamaConfig(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).float().eval()
    # HF init (std 0.02, norms = 1) gives near-uniform attention and tiny logits;
    # use larger random weights so the comparison is meaningful.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return cfg, hf


def _ours_from_hf(cfg, hf, **overrides):
    ours = LlamaForCausalLM(LlamaConfig.from_hf(cfg, **overrides), rngs=nnx.Rngs(0))
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
    cfg, hf = _hf_model()
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


def test_from_hf_config_spellings():
    # transformers-5 object
    cfg = transformers.LlamaConfig(**BASE, rope_theta=5e5, rope_scaling=dict(LLAMA3))
    ours = LlamaConfig.from_hf(cfg)
    assert ours.rope_theta == 5e5 and ours.rope_scaling["rope_type"] == "llama3"
    assert ours.head_dim == 8 and ours.num_key_value_heads == 2
    # old config.json spelling: rope_theta at top level, rope_scaling with "type"
    old = {**BASE, "rope_theta": 5e5, "hidden_act": "silu",
           "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
    assert LlamaConfig.from_hf(old) == ours
    # new dict spelling
    new = {**BASE, "rope_parameters": {"rope_theta": 5e5, **LLAMA3}}
    assert LlamaConfig.from_hf(new) == ours
    plain = LlamaConfig.from_hf({**BASE, "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4
    assert LlamaConfig.from_dict(ours.to_dict()) == ours
    assert hash(LlamaConfig.from_dict(ours.to_dict())) == hash(ours)
    with pytest.raises(NotImplementedError):
        LlamaConfig(**BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_llama3_inv_freq_matches_transformers():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    cfg = transformers.LlamaConfig(**{**BASE, "head_dim": 64}, rope_theta=5e5, rope_scaling=dict(LLAMA3))
    ref, attn_factor = ROPE_INIT_FUNCTIONS["llama3"](cfg)
    assert attn_factor == 1.0
    ours = rope_inv_freq(64, 5e5, LLAMA3)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6)


def test_state_dict_mapping_errors_and_roundtrip(base):
    cfg, hf, ours = base
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = params_to_hf_state_dict(ours)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    fresh = LlamaForCausalLM(LlamaConfig.from_hf(cfg), rngs=nnx.Rngs(1))
    bad = dict(sd)
    del bad["model.layers.1.mlp.up_proj.weight"]
    bad["model.layers.1.mlp.extra.weight"] = np.zeros(3)
    with pytest.raises(KeyError) as ei:
        params_from_hf_state_dict(fresh, bad)
    assert "model.layers.1.mlp.up_proj.weight" in str(ei.value)
    assert "model.layers.1.mlp.extra.weight" in str(ei.value)
    wrong = dict(sd)
    wrong["model.norm.weight"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="model.norm.weight"):
        params_from_hf_state_dict(fresh, wrong)


def test_attribute_tree_mirrors_hf(base):
    _, _, m = base
    layer = m.model.layers[1]
    assert isinstance(m.model.layers, nnx.List)
    assert m.model.embed_tokens.embedding.shape == (V, 32)
    assert layer.self_attn.q_proj.kernel.shape == (32, 32)
    assert layer.self_attn.k_proj.kernel.shape == (32, 16)
    assert layer.mlp.down_proj.kernel.shape == (64, 32)
    assert layer.input_layernorm.weight.shape == (32,)
    assert m.lm_head.kernel.shape == (32, V)
    tied = LlamaForCausalLM(LlamaConfig(**BASE, tie_word_embeddings=True), rngs=nnx.Rngs(0))
    assert tied.lm_head is None


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
    # right: append pad tokens (any id) with mask 0
    ids_r = np.concatenate([ids, np.full((3, 4), 5)], axis=1)
    mask_r = np.concatenate([np.ones((3, 6), int), np.zeros((3, 4), int)], axis=1)
    out_r = np.asarray(_fwd(m, jnp.asarray(ids_r), jnp.asarray(mask_r)))
    np.testing.assert_allclose(out_r[:, :6], ref, atol=1e-5)
    # left: prepend pad tokens; positions come from the mask
    ids_l = np.concatenate([np.full((3, 4), 7), ids], axis=1)
    mask_l = mask_r[:, ::-1].copy()
    out_l = np.asarray(_fwd(m, jnp.asarray(ids_l), jnp.asarray(mask_l)))
    np.testing.assert_allclose(out_l[:, 4:], ref, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(positions_from_mask(jnp.asarray(mask_l)))[0],
                                  [0, 0, 0, 0, 0, 1, 2, 3, 4, 5])


def test_no_nan_with_fully_padded_rows(base):
    _, _, m = base
    ids = jnp.array([[3, 4, 5, 6], [0, 0, 0, 0], [-1, -1, 9, 10]])
    mask = jnp.array([[1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 1, 1]])
    out = _fwd(m, ids, mask)
    assert bool(jnp.all(jnp.isfinite(out)))

    def loss(model):
        return jnp.sum(model(ids, attention_mask=mask) * mask[..., None])

    grads = nnx.jit(nnx.grad(loss))(m)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_jit_and_inputs_embeds(base):
    _, _, m = base
    ids, _, left = _batch(3)
    ids, left = jnp.asarray(ids), jnp.asarray(left)
    eager = m(ids, attention_mask=left)

    @nnx.jit
    def f(model, ids, mask):
        return model(ids, attention_mask=mask)

    np.testing.assert_allclose(np.asarray(f(m, ids, left)), np.asarray(eager), atol=1e-5)

    graphdef, state = nnx.split(m)
    pure = jax.jit(lambda st, e, mask: nnx.merge(graphdef, st)(inputs_embeds=e, attention_mask=mask))
    emb = m.embed(ids)
    assert emb.shape == (3, 9, 32)
    np.testing.assert_allclose(np.asarray(pure(state, emb, left)), np.asarray(eager), atol=1e-5)
    with pytest.raises(ValueError):
        m(ids, inputs_embeds=emb)

    # gradients w.r.t. input embeddings (what WDPO needs)
    g = jax.jit(jax.grad(lambda e: jnp.sum(m(inputs_embeds=e, attention_mask=left)[:, -1, 0])))(emb)
    assert g.shape == emb.shape and bool(jnp.all(jnp.isfinite(g)))


def test_remat_same_logits_and_grads(base):
    cfg, hf, m = base
    m_remat = _ours_from_hf(cfg, hf, remat=True)
    assert m_remat.config.remat and not m.config.remat
    ids, _, left = _batch(4)
    ids, left = jnp.asarray(ids), jnp.asarray(left)

    def loss(model):
        logits = model(ids, attention_mask=left)
        lp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(lp, ids[..., None], -1)[..., 0] * left)

    def jaxpr_text(model):
        graphdef, state = nnx.split(model)
        return str(jax.make_jaxpr(lambda st: loss(nnx.merge(graphdef, st)))(state))

    assert "remat" in jaxpr_text(m_remat) and "remat" not in jaxpr_text(m)

    l0, g0 = nnx.jit(nnx.value_and_grad(loss))(m)
    l1, g1 = nnx.jit(nnx.value_and_grad(loss))(m_remat)
    np.testing.assert_allclose(float(l0), float(l1), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=1e-5)


def test_bf16_compute_runs(base):
    cfg, hf, _ = base
    m16 = LlamaForCausalLM(LlamaConfig.from_hf(cfg), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    params_from_hf_state_dict(m16, hf.state_dict())
    assert m16.model.layers[0].mlp.up_proj.kernel.dtype == jnp.float32  # param_dtype
    ids, right, _ = _batch(5)
    out = _fwd(m16, jnp.asarray(ids), jnp.asarray(right))
    assert out.dtype == jnp.float32
    ref = _hf_logits(hf, ids, right)
    real = right.astype(bool)
    assert np.abs(np.asarray(out) - ref)[real].max() < 0.1 * np.abs(ref[real]).max()


def test_config_is_dataclass_with_hf_fields():
    names = {f.name for f in dataclasses.fields(LlamaConfig)}
    for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
              "rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings",
              "attention_bias", "mlp_bias", "pad_token_id", "bos_token_id", "eos_token_id", "remat"):
        assert n in names
    assert LlamaConfig(**BASE).head_dim == 8


def test_flat_dot_general_values_and_no_activation_transpose():
    """Projections run as one 2-D matmul: same values and gradients as the 3-D contraction, and
    the compiled kernel gradient holds no transposed copy of the [B*T, N] output gradient
    (which XLA:CPU otherwise materialises; see layers.flat_dot_general)."""
    import re

    from alignshift.models.layers import flat_dot_general

    B, T, K, N = 3, 40, 16, 24
    x = jax.random.normal(jax.random.key(0), (B, T, K))
    w = jax.random.normal(jax.random.key(1), (K, N))
    dn = (((2,), (0,)), ((), ()))
    np.testing.assert_allclose(flat_dot_general(x, w, dn), jax.lax.dot_general(x, w, dn), rtol=1e-6, atol=1e-6)
    # other contraction patterns pass through unchanged
    dn2 = (((2,), (2,)), ((0,), (0,)))
    y = jax.random.normal(jax.random.key(2), (B, N, K))
    np.testing.assert_array_equal(flat_dot_general(x, y, dn2), jax.lax.dot_general(x, y, dn2))

    def loss(dot):
        return lambda x, w: jnp.sum(jax.nn.silu(dot(x, w, dn)) ** 2)

    g_flat = jax.grad(loss(flat_dot_general), argnums=(0, 1))(x, w)
    g_ref = jax.grad(loss(jax.lax.dot_general), argnums=(0, 1))(x, w)
    for a, b in zip(g_flat, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(jax.grad(loss(flat_dot_general), argnums=1)).lower(x, w).compile().as_text()
    assert not re.search(rf"f32\[{N},{B * T}\]", hlo), "kernel gradient transposes the [B*T, N] output gradient"
    hlo_3d = jax.jit(jax.grad(loss(jax.lax.dot_general), argnums=1)).lower(x, w).compile().as_text()
    assert re.search(rf"f32\[{N},{B * T}\]", hlo_3d), "the 3-D contraction no longer transposes: recheck this test"
