"""GPT-2 (Flax NNX) tests: parity with transformers, masking, jit/remat, HF (Conv1D) weight mapping."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models.gpt2 import (
    GPT2Config,
    GPT2LMHeadModel,
    params_from_hf_state_dict,
    params_to_hf_state_dict,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 97
BASE = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=24, bos_token_id=0,
            eos_token_id=1)

CASES = {
    "tied_gelu_new": {},
    "untied_inner_exact_gelu_layer_scaled": dict(
        tie_word_embeddings=False, n_inner=48, activation_function="gelu",
        scale_attn_by_inverse_layer_idx=True, layer_norm_epsilon=1e-4),
}


@nnx.jit
def _fwd(model, ids, mask=None):
    return model(ids, attention_mask=mask)


def _hf_model(**overrides):
    cfg = transformers.GPT2Config(**{**BASE, **overrides}, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(cfg).float().eval()
    # HF init (std 0.02, LayerNorm = (1, 0)) gives near-uniform attention and tiny logits;
    # use larger random weights and non-trivial LayerNorm affine parameters.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if ".ln_" in name:
                p.copy_(1.0 + 0.2 * noise if name.endswith("weight") else 0.2 * noise)
            else:
                p.copy_(0.2 * noise)
    return cfg, hf


def _ours_from_hf(cfg, hf, **overrides):
    ours = GPT2LMHeadModel(GPT2Config.from_hf(cfg, **overrides), rngs=nnx.Rngs(0))
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


def test_inputs_embeds_parity_with_transformers(base):
    # HF adds wpe to inputs_embeds: our inputs_embeds are token embeddings before positions too
    _, hf, m = base
    ids, _, left = _batch(7)
    emb = np.random.RandomState(0).randn(3, 9, 32).astype(np.float32)
    pos = np.maximum(np.cumsum(left, axis=1) - 1, 0)
    with torch.no_grad():
        ref = hf(inputs_embeds=torch.tensor(emb), attention_mask=torch.tensor(left),
                 position_ids=torch.tensor(pos)).logits.numpy()
    got = np.asarray(m(inputs_embeds=jnp.asarray(emb), attention_mask=jnp.asarray(left)))
    real = left.astype(bool)
    assert np.abs(got - ref)[real].max() / np.abs(ref[real]).max() < 1e-4


def test_config_from_hf_spellings():
    hf = transformers.GPT2Config(**BASE, n_inner=48)
    ours = GPT2Config.from_hf(hf)
    assert (ours.n_embd, ours.n_layer, ours.n_head, ours.n_positions, ours.n_inner) == (32, 2, 4, 24, 48)
    assert ours.hidden_size == 32 and ours.num_hidden_layers == 2 and ours.num_attention_heads == 4
    assert ours.intermediate_size == 48 and ours.head_dim == 8 and ours.max_position_embeddings == 24
    assert ours.activation_function == "gelu_new" and ours.tie_word_embeddings
    assert GPT2Config.from_hf(hf.to_dict()) == ours
    generic = {"vocab_size": V, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
               "max_position_embeddings": 24, "n_inner": 48, "bos_token_id": 0, "eos_token_id": 1}
    assert GPT2Config.from_hf(generic) == ours
    assert GPT2Config(**BASE).intermediate_size == 128
    assert GPT2Config.from_dict(ours.to_dict()) == ours
    assert hash(GPT2Config.from_dict(ours.to_dict())) == hash(ours)
    assert hash(ours) != hash(dataclasses.replace(ours, n_inner=64))
    with pytest.raises(NotImplementedError):
        GPT2Config(**BASE, activation_function="mish")
    with pytest.raises(NotImplementedError):
        GPT2Config.from_hf({**BASE, "add_cross_attention": True})


def test_state_dict_mapping_errors_and_roundtrip(base):
    cfg, hf, ours = base
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    back = params_to_hf_state_dict(ours)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    # Conv1D weights are [in, out] in HF and copied without transposing
    c_attn = ours.transformer.h[0].attn.c_attn.kernel
    assert c_attn.shape == (32, 96) == sd["transformer.h.0.attn.c_attn.weight"].shape
    assert "lm_head.weight" not in params_to_hf_state_dict(ours, include_tied_head=False)

    # original openai-community/gpt2 layout: no "transformer." prefix, no lm_head, mask buffers
    orig = {k[len("transformer."):]: v for k, v in sd.items() if k.startswith("transformer.")}
    orig["h.0.attn.bias"] = np.tril(np.ones((1, 1, 24, 24), np.float32))
    orig["h.1.attn.masked_bias"] = np.array(-1e4, np.float32)
    fresh = GPT2LMHeadModel(GPT2Config.from_hf(cfg), rngs=nnx.Rngs(1))
    params_from_hf_state_dict(fresh, orig)
    ids, right, _ = _batch(6)
    np.testing.assert_array_equal(np.asarray(_fwd(fresh, jnp.asarray(ids), jnp.asarray(right))),
                                  np.asarray(_fwd(ours, jnp.asarray(ids), jnp.asarray(right))))

    bad = dict(sd)
    del bad["transformer.h.1.mlp.c_fc.weight"]
    bad["transformer.h.1.mlp.extra.weight"] = np.zeros(3)
    with pytest.raises(KeyError) as ei:
        params_from_hf_state_dict(fresh, bad)
    assert "transformer.h.1.mlp.c_fc.weight" in str(ei.value)
    assert "transformer.h.1.mlp.extra.weight" in str(ei.value)
    wrong = dict(sd)
    wrong["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError, match="transformer.h.0.attn.c_attn.weight"):
        params_from_hf_state_dict(fresh, wrong)


def test_untied_lm_head_is_transposed():
    cfg, hf = _hf_model(**CASES["untied_inner_exact_gelu_layer_scaled"])
    ours = _ours_from_hf(cfg, hf)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    assert ours.lm_head.kernel.shape == (32, V)
    np.testing.assert_array_equal(np.asarray(ours.lm_head.kernel[...]), sd["lm_head.weight"].T)
    back = params_to_hf_state_dict(ours)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])
    with pytest.raises(KeyError, match="lm_head.weight"):
        params_from_hf_state_dict(ours, {k: v for k, v in sd.items() if k != "lm_head.weight"})


def test_attribute_tree_mirrors_hf(base):
    _, _, m = base
    blk = m.transformer.h[1]
    assert isinstance(m.transformer.h, nnx.List)
    assert m.transformer.wte.embedding.shape == (V, 32)
    assert m.transformer.wpe.embedding.shape == (24, 32)
    assert blk.attn.c_attn.kernel.shape == (32, 96) and blk.attn.c_attn.bias.shape == (96,)
    assert blk.attn.c_proj.kernel.shape == (32, 32)
    assert blk.mlp.c_fc.kernel.shape == (32, 128) and blk.mlp.c_proj.kernel.shape == (128, 32)
    assert blk.ln_1.weight.shape == (32,) and blk.ln_2.bias.shape == (32,)
    assert m.transformer.ln_f.bias.shape == (32,)
    assert m.lm_head is None


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


def test_positions_beyond_n_positions_are_clipped(base):
    _, _, m = base
    ids = jnp.asarray(np.random.RandomState(0).randint(0, V, (1, 30)))  # n_positions = 24
    out = _fwd(m, ids)
    assert out.shape == (1, 30, V) and bool(jnp.all(jnp.isfinite(out)))


def test_jit_and_inputs_embeds(base):
    _, _, m = base
    ids, _, left = _batch(3)
    ids, left = jnp.asarray(ids), jnp.asarray(left)
    eager = _fwd(m, ids, left)  # input_ids path (jitted: op-by-op eager is slow on CPU)

    graphdef, state = nnx.split(m)
    pure = jax.jit(lambda st, e, mask: nnx.merge(graphdef, st)(inputs_embeds=e, attention_mask=mask))
    emb = m.embed(ids)
    assert emb.shape == (3, 9, 32)
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(m.transformer.wte.embedding[...])[ids])
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
    m16 = GPT2LMHeadModel(GPT2Config.from_hf(cfg), rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    params_from_hf_state_dict(m16, hf.state_dict())
    assert m16.transformer.h[0].mlp.c_fc.kernel.dtype == jnp.float32  # param_dtype
    ids, right, _ = _batch(5)
    out = _fwd(m16, jnp.asarray(ids), jnp.asarray(right))
    assert out.dtype == jnp.float32
    ref = _hf_logits(hf, ids, right)
    real = right.astype(bool)
    assert np.abs(np.asarray(out) - ref)[real].max() < 0.1 * np.abs(ref[real]).max()
