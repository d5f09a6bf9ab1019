"""Gemma / Gemma 2 (Flax NNX) tests: parity with transformers, soft-capping, sliding window,
masking, jit/remat, HF weight mapping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models.gemma import (
    GemmaConfig,
    GemmaForCausalLM,
    GemmaModel,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
    sliding_window_mask,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 97
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
# Gemma 2: window 4 < seq 12, both layer types, soft-caps small enough to be active,
# query_pre_attn_scalar != head_dim.
G2 = dict(BASE, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=4,
          attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
          layer_types=["sliding_attention", "full_attention", "sliding_attention"])

CASES = {
    "gemma_gqa": ("gemma", {}),
    "gemma_mqa_bias_headdim": ("gemma", dict(num_key_value_heads=1, head_dim=16, attention_bias=True,
                                             rope_theta=500.0)),
    "gemma2_window_softcap": ("gemma2", G2),
    "gemma2_mha_alternating": ("gemma2", dict(BASE, num_key_value_heads=4, sliding_window=3,
                                              query_pre_attn_scalar=8, attn_logit_softcapping=5.0,
                                              final_logit_softcapping=3.0)),
}


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _hf_model(kind, **kw):
    kw = {k: list(v) if isinstance(v, list) else v for k, v in {**BASE, **kw}.items()}
    cls_cfg, cls_model = ((transformers.GemmaConfig, transformers.GemmaForCausalLM) if kind == "gemma"
                          else (transformers.Gemma2Config, transformers.Gemma2ForCausalLM))
    cfg = cls_cfg(**kw, attn_implementation="eager")
    torch.manual_seed(0)
    hf = cls_model(cfg).float().eval()
    # HF init (std 0.02, zero norms) gives near-uniform attention and tiny logits;
    # use larger random weights (and non-trivial (1 + w) norm scales).
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(0.3 * noise if "norm" in name else 0.2 * noise)
    return cfg, hf


def _ours_from_hf(cfg, hf, **overrides):
    ours = GemmaForCausalLM(GemmaConfig.from_hf(cfg, **overrides), rngs=nnx.Rngs(0))
    return params_from_hf_state_dict(ours, hf.state_dict())


def _hf_logits(hf, ids, mask):
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(pos), use_cache=False)
    return out.logits.float().numpy()


def _batch(seed=0, B=3, T=12):
    rs = np.random.RandomState(seed)
    ids = rs.randint(0, V, size=(B, T)).astype(np.int64)
    lens = np.array([T, 7, 3])[:B]
    right = (np.arange(T)[None] < lens[:, None]).astype(np.int64)
    left = right[:, ::-1].copy()
    return ids, right, left


def _rel_err(got, ref, mask):
    real = mask.astype(bool)
    scale = max(1.0, np.abs(ref[real]).max())
    return np.abs(got - ref)[real].max() / scale


@pytest.fixture(scope="module")
def g2():
    cfg, hf = _hf_model("gemma2", **G2)
    return cfg, hf, _ours_from_hf(cfg, hf)


@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_transformers(case):
    kind, kw = CASES[case]
    cfg, hf = _hf_model(kind, **kw)
    ours = _ours_from_hf(cfg, hf)
    assert ours.config.model_type == kind
    ids, right, left = _batch()
    for mask in (right, left):
        ref = _hf_logits(hf, ids, mask)
        got = np.asarray(_fwd(ours, jnp.asarray(ids), jnp.asarray(mask)))
        assert got.dtype == np.float32 and got.shape == ref.shape
        err = _rel_err(got, ref, mask)
        assert err < 1e-4, (case, err)
        assert np.abs(ref[mask.astype(bool)]).std() > 0.3  # non-trivial logits


def test_gemma2_features_are_active_and_window_off_by_one(g2):
    """Each Gemma 2 feature changes the logits, so parity above really checks it."""
    cfg, hf, ours = g2
    assert ours.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    ids, right, left = _batch(6)
    for mask in (right, left):
        ref = _hf_logits(hf, ids, mask)
        assert _rel_err(np.asarray(_fwd(ours, jnp.asarray(ids), jnp.asarray(mask))), ref, mask) < 1e-4
        assert np.abs(ref).max() > 0.8 * 3.0  # final cap saturating
        variants = {
            "window-1": dict(sliding_window=3), "window+1": dict(sliding_window=5),
            "no_window": dict(layer_types=["full_attention"] * 3),
            "no_attn_cap": dict(attn_logit_softcapping=None),
            "no_final_cap": dict(final_logit_softcapping=None),
            "gemma1_scaling": dict(query_pre_attn_scalar=None),
        }
        for name, ov in variants.items():
            other = _ours_from_hf(cfg, hf, **ov)
            err = _rel_err(np.asarray(_fwd(other, jnp.asarray(ids), jnp.asarray(mask))), ref, mask)
            assert err > 1e-3, (name, err)


def test_sliding_window_mask_matches_hf_convention():
    m = np.asarray(sliding_window_mask(jnp.ones((1, 6), jnp.int32), 3))[0, 0]
    q, k = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    np.testing.assert_array_equal(m, (k <= q) & (k > q - 3))
    assert m.sum(-1).tolist() == [1, 2, 3, 3, 3, 3]  # itself + window-1 previous
    from transformers.masking_utils import sliding_window_causal_mask_function
    fn = sliding_window_causal_mask_function(3)
    ref = np.array([[bool(fn(0, 0, torch.tensor(i), torch.tensor(j))) for j in range(6)] for i in range(6)])
    np.testing.assert_array_equal(m, ref)
    # padding: masked keys never visible
    pm = np.asarray(sliding_window_mask(jnp.array([[0, 0, 1, 1, 1, 1]]), 2))[0, 0]
    assert not pm[:, :2].any() and pm[5].tolist() == [False] * 4 + [True, True]


def test_from_hf_config_spellings():
    g2cfg = transformers.Gemma2Config(**BASE)
    ours = GemmaConfig.from_hf(g2cfg)
    assert ours.model_type == "gemma2" and ours.layer_types == ["sliding_attention", "full_attention"]
    assert (ours.query_pre_attn_scalar, ours.attn_logit_softcapping, ours.final_logit_softcapping,
            ours.sliding_window) == (256, 50.0, 30.0, 4096)
    assert ours.hidden_activation == "gelu_pytorch_tanh" and ours.rope_theta == 10000.0
    # old-style config.json dict: no layer_types (alternating rule), top-level rope_theta
    old = {**BASE, "model_type": "gemma2", "num_hidden_layers": 2, "rope_theta": 10000.0,
           "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
           "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}
    assert GemmaConfig.from_hf(old) == ours
    assert GemmaConfig.from_dict(ours.to_dict()) == ours
    assert hash(GemmaConfig.from_dict(ours.to_dict())) == hash(ours)
    # v5 Gemma 1 object (hidden_act, rope_parameters)
    g1 = GemmaConfig.from_hf(transformers.GemmaConfig(**BASE, rope_parameters={"rope_theta": 500.0,
                                                                               "rope_type": "default"}))
    assert g1.model_type == "gemma" and g1.rope_theta == 500.0
    assert g1.layer_types == ["full_attention"] * 2 and g1.sliding_window is None
    assert g1.query_pre_attn_scalar == 8 and g1.attn_logit_softcapping is None
    assert (g1.pad_token_id, g1.bos_token_id, g1.eos_token_id) == (0, 2, 1)
    # legacy Gemma 1 config.json: hidden_act "gelu" means the tanh approximation
    legacy = {**BASE, "model_type": "gemma", "hidden_act": "gelu", "hidden_activation": None,
              "rope_theta": 500.0}
    assert GemmaConfig.from_hf(legacy) == g1
    with pytest.raises(NotImplementedError):
        GemmaConfig.from_hf({**BASE, "model_type": "gemma3_text"})
    with pytest.raises(NotImplementedError):
        GemmaConfig.from_hf({**BASE, "model_type": "gemma", "tie_word_embeddings": False})
    with pytest.raises(ValueError):
        GemmaConfig(**BASE, model_type="gemma2")  # sliding layers but no window
    with pytest.raises(ValueError):
        GemmaConfig(**BASE, model_type="gemma2", sliding_window=4, layer_types=["full_attention"])


def test_state_dict_mapping_errors_and_roundtrip(g2):
    cfg, hf, ours = g2
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = params_to_hf_state_dict(ours)
    assert set(back) == set(sd) - {"lm_head.weight"}  # tied: not emitted, ignored on import
    for k in back:
        np.testing.assert_array_equal(back[k], sd[k])
    fresh = GemmaForCausalLM(GemmaConfig.from_hf(cfg), rngs=nnx.Rngs(1))
    params_from_hf_state_dict(fresh, back)
    for k, v in params_to_hf_state_dict(fresh).items():
        np.testing.assert_array_equal(v, back[k])
    bad = dict(sd)
    del bad["model.layers.1.pre_feedforward_layernorm.weight"]
    bad["model.layers.1.mlp.extra.weight"] = np.zeros(3)
    with pytest.raises(KeyError) as ei:
        params_from_hf_state_dict(fresh, bad)
    assert "model.layers.1.pre_feedforward_layernorm.weight" in str(ei.value)
    assert "model.layers.1.mlp.extra.weight" in str(ei.value)
    params_from_hf_state_dict(fresh, bad, strict=False)  # non-strict: skip silently
    wrong = dict(sd)
    wrong["model.norm.weight"] = np.ones(5, np.float32)
    with pytest.raises(ValueError, match="model.norm.weight"):
        params_from_hf_state_dict(fresh, wrong)
    # a Gemma 2 checkpoint does not load into a Gemma 1 model (extra norms)
    g1 = GemmaForCausalLM(GemmaConfig.from_hf(cfg, model_type="gemma", layer_types=None),
                          rngs=nnx.Rngs(0))
    with pytest.raises(KeyError, match="post_feedforward_layernorm"):
        params_from_hf_state_dict(g1, sd)


def test_attribute_tree_mirrors_hf(g2):
    _, _, m = g2
    layer = m.model.layers[1]
    assert isinstance(m.model.layers, nnx.List) and len(m.model.layers) == 3
    assert m.lm_head is None
    assert m.model.embed_tokens.embedding.shape == (V, 32)
    assert layer.self_attn.q_proj.kernel.shape == (32, 32)
    assert layer.self_attn.k_proj.kernel.shape == (32, 16)
    assert layer.mlp.down_proj.kernel.shape == (64, 32)
    for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
              "post_feedforward_layernorm"):
        assert getattr(layer, n).weight.shape == (32,)
    g1 = GemmaForCausalLM(GemmaConfig(**BASE), rngs=nnx.Rngs(0))
    assert not hasattr(g1.model.layers[0], "pre_feedforward_layernorm")
    assert float(jnp.abs(g1.model.norm.weight[...]).max()) == 0.0  # zero-centred (1 + w)


def test_causality(g2):
    _, _, m = g2
    ids, _, _ = _batch(1)
    a = np.asarray(_fwd(m, jnp.asarray(ids)))
    ids2 = ids.copy()
    ids2[:, 6] = (ids2[:, 6] + 1) % V
    b = np.asarray(_fwd(m, jnp.asarray(ids2)))
    np.testing.assert_array_equal(a[:, :6], b[:, :6])
    assert np.abs(a[:, 6:] - b[:, 6:]).max() > 1e-3


def test_padding_invariance(g2):
    _, _, m = g2
    ids, _, _ = _batch(2, T=8)
    ref = np.asarray(_fwd(m, jnp.asarray(ids)))
    ids_r = np.concatenate([ids, np.full((3, 4), 5)], axis=1)
    mask_r = np.concatenate([np.ones((3, 8), int), np.zeros((3, 4), int)], axis=1)
    out_r = np.asarray(_fwd(m, jnp.asarray(ids_r), jnp.asarray(mask_r)))
    np.testing.assert_allclose(out_r[:, :8], ref, atol=1e-5)
    ids_l = np.concatenate([np.full((3, 4), 7), ids], axis=1)
    mask_l = mask_r[:, ::-1].copy()
    out_l = np.asarray(_fwd(m, jnp.asarray(ids_l), jnp.asarray(mask_l)))
    np.testing.assert_allclose(out_l[:, 4:], ref, atol=1e-5)


def test_no_nan_with_fully_padded_rows(g2):
    _, _, m = g2
    ids = jnp.array([[3, 4, 5, 6, 7, 8], [0] * 6, [-1, -1, -1, 9, 10, 11]])
    mask = jnp.array([[1] * 6, [0] * 6, [0, 0, 0, 1, 1, 1]])
    out = _fwd(m, ids, mask)
    assert bool(jnp.all(jnp.isfinite(out)))

    def loss(model):
        return jnp.sum(model(ids, attention_mask=mask) * mask[..., None])

    grads = nnx.jit(nnx.grad(loss))(m)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_jit_inputs_embeds_and_hidden_states(g2):
    _, hf, m = g2
    ids, _, left = _batch(3)
    jids, jleft = jnp.asarray(ids), jnp.asarray(left)
    eager = m(jids, attention_mask=jleft)
    np.testing.assert_allclose(np.asarray(_fwd(m, jids, jleft)), np.asarray(eager), atol=1e-5)

    # embed() is scaled by sqrt(hidden) like HF's embedding module
    emb = m.embed(jids)
    with torch.no_grad():
        hf_emb = hf.get_input_embeddings()(torch.tensor(ids)).numpy()
    np.testing.assert_allclose(np.asarray(emb), hf_emb, rtol=1e-6, atol=1e-6)

    graphdef, state = nnx.split(m)
    pure = jax.jit(lambda st, e, mask: nnx.merge(graphdef, st)(inputs_embeds=e, attention_mask=mask))
    np.testing.assert_allclose(np.asarray(pure(state, emb, jleft)), np.asarray(eager), atol=1e-5)
    h = m.hidden_states(jids, attention_mask=jleft)
    assert h.shape == (3, 12, 32)
    np.testing.assert_allclose(np.asarray(m.logits_from_hidden(h)), np.asarray(eager), atol=1e-5)
    with pytest.raises(ValueError):
        m(jids, inputs_embeds=emb)
    g = jax.jit(jax.grad(lambda e: jnp.sum(m(inputs_embeds=e, attention_mask=jleft)[:, -1, 0])))(emb)
    assert g.shape == emb.shape and bool(jnp.all(jnp.isfinite(g)))


def test_remat_same_logits_and_grads(g2):
    cfg, hf, m = g2
    m_remat = _ours_from_hf(cfg, hf, remat=True)
    ids, _, left = _batch(4)
    ids, left = jnp.asarray(ids), jnp.asarray(left)

    def loss(model):
        lp = jax.nn.log_softmax(model(ids, attention_mask=left), axis=-1)
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


def test_bf16_compute_runs_and_normalizer_rounding(g2):
    cfg, hf, _ = g2
    m16 = GemmaForCausalLM(GemmaConfig.from_hf(cfg), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    params_from_hf_state_dict(m16, hf.state_dict())
    assert m16.model.layers[0].mlp.up_proj.kernel.dtype == jnp.float32  # param_dtype
    ids, right, _ = _batch(5)
    out = _fwd(m16, jnp.asarray(ids), jnp.asarray(right))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    ref = _hf_logits(hf, ids, right)
    real = right.astype(bool)
    assert np.abs(np.asarray(out) - ref)[real].max() < 0.1 * np.abs(ref[real]).max()
    # HF: sqrt(3072) = 55.4256 becomes 55.5 in bf16
    big = GemmaModel(GemmaConfig(vocab_size=2, hidden_size=3072, intermediate_size=8,
                                 num_hidden_layers=0, num_attention_heads=12),
                     rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    big.embed_tokens.embedding.set_value(jnp.ones((2, 3072)))
    assert float(big.embed(jnp.array([[1]]))[0, 0, 0]) == 55.5


def test_config_is_dataclass_with_hf_fields():
    names = {f.name for f in dataclasses.fields(GemmaConfig)}
    for n in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
              "max_position_embeddings", "hidden_activation", "query_pre_attn_scalar",
              "attn_logit_softcapping", "final_logit_softcapping", "sliding_window", "layer_types",
              "pad_token_id", "bos_token_id", "eos_token_id", "remat"):
        assert n in names
    c = GemmaConfig(**{**BASE, "head_dim": None})
    assert c.head_dim == 8 and c.query_pre_attn_scalar == 8
