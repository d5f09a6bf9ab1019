"""Chunked log-probs from hidden states: same values and gradients as the full-logits path,
and the [B, T, V] float32 logits are really not materialised (XLA's own memory accounting)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignshift.losses import make_objective
from alignshift.losses.logps import chunked_sequence_logps, sequence_logps, sequence_logps_wpo
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.forward import split_model
from alignshift.train.steps import init_state, make_preference_step


def _inputs(B=3, T=11, d=8, V=37, seed=0):
    rs = np.random.RandomState(seed)
    h = jnp.asarray(rs.randn(B, T, d), jnp.float32)
    w = jnp.asarray(rs.randn(d, V), jnp.float32)
    labels = jnp.asarray(rs.randint(0, V, (B, T)), jnp.int32)
    mask = jnp.asarray(rs.rand(B, T) > 0.3, jnp.int32).at[2].set(0)  # one row without response
    return h, w, labels, mask


@pytest.mark.parametrize("chunk", [1, 4, 11, 16])
@pytest.mark.parametrize("with_wpo", [False, True])
def test_chunked_equals_full_values_and_grads(chunk, with_wpo):
    h, w, labels, mask = _inputs()
    full = sequence_logps_wpo if with_wpo else sequence_logps

    def f_full(h, w):
        out = full(jnp.tanh(h) @ w, labels, mask)
        return out[0].sum() + (out[2].sum() if with_wpo else 0.0), out

    def f_chunk(h, w):
        out = chunked_sequence_logps(h, lambda x: jnp.tanh(x) @ w, labels, mask, chunk_size=chunk, with_wpo=with_wpo)
        return out[0].sum() + (out[2].sum() if with_wpo else 0.0), out

    (_, a), ga = jax.value_and_grad(f_full, argnums=(0, 1), has_aux=True)(h, w)
    (_, b), gb = jax.value_and_grad(f_chunk, argnums=(0, 1), has_aux=True)(h, w)
    for x, y in zip(a, b):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    assert float(b[0][2]) == 0.0 and float(b[1][2]) == 0.0
    for x, y in zip(ga, gb):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_chunked_never_materialises_full_logits():
    B, T, d, V = 4, 128, 16, 8192
    h = jax.ShapeDtypeStruct((B, T, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, V), jnp.float32)
    lab = jax.ShapeDtypeStruct((B, T), jnp.int32)

    def temp(fn):
        g = jax.jit(jax.grad(lambda h, w, lab: fn(h, w, lab)[0].sum(), argnums=(0, 1)))
        return g.lower(h, w, lab).compile().memory_analysis().temp_size_in_bytes

    full = temp(lambda h, w, lab: sequence_logps(h @ w, lab, jnp.ones_like(lab)))
    chunked = temp(lambda h, w, lab: chunked_sequence_logps(h, lambda x: x @ w, lab, jnp.ones_like(lab),
                                                            chunk_size=16))
    logits_bytes = B * T * V * 4
    assert full >= logits_bytes, (full, logits_bytes)
    assert chunked < logits_bytes / 2, (chunked, logits_bytes)


def test_chunk_size_errors():
    h, w, labels, mask = _inputs()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_sequence_logps(h, lambda x: x @ w, labels, mask, chunk_size=0)
    with pytest.raises(ValueError, match="hidden shape"):
        chunked_sequence_logps(h[:, :5], lambda x: x @ w, labels, mask, chunk_size=2)


def test_preference_step_with_logits_chunk_matches():
    rs = np.random.RandomState(1)
    batch = {}
    for g in ("chosen", "rejected"):
        batch[f"{g}_input_ids"] = jnp.asarray(rs.randint(0, 61, (4, 10)), jnp.int32)
        batch[f"{g}_attention_mask"] = jnp.ones((4, 10), jnp.int32)
        batch[f"{g}_loss_mask"] = jnp.asarray(np.arange(10)[None].repeat(4, 0) >= 4, jnp.int32)
    _assert_step_matches(batch, logits_chunk=3)


def _assert_step_matches(batch, **step_kwargs):
    """One DPO step (in-step reference) with ``step_kwargs`` equals the plain step: loss, grad
    norm and updated parameters."""
    graphdef, params, rest = _tiny_llama()
    ref = jax.tree_util.tree_map(lambda x: 0.9 * x, params)
    out = []
    for kw in ({}, step_kwargs):
        tx = optax.sgd(0.1)
        step = make_preference_step(graphdef, rest, tx, make_objective("dpo"), **kw)
        state = init_state(jax.tree_util.tree_map(jnp.copy, params), tx)
        state, m = step(state, batch, ref)
        out.append((float(m["loss"]), float(m["grad_norm"]), state["params"]))
    np.testing.assert_allclose(out[1][:2], out[0][:2], rtol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(out[0][2]), jax.tree_util.tree_leaves(out[1][2])):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)

def _tiny_llama():
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return split_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))


def _ragged_rows(rs, B=5, T=14):
    """Right-padded prompt + response rows of varied lengths (one response ends at the last position)."""
    ids = rs.randint(3, 61, (B, T)).astype(np.int32)
    am, lm = np.zeros((B, T), np.int32), np.zeros((B, T), np.int32)
    for i, (p, r) in enumerate([(2, 4), (7, 5), (3, 2), (9, 5), (5, 1)][:B]):
        am[i, :p + r] = 1
        lm[i, p:p + r] = 1
    return jnp.asarray(ids), jnp.asarray(am), jnp.asarray(lm)


@pytest.mark.parametrize("chunk,with_wpo", [(0, True), (2, False)])
def test_response_window_equals_full_values_and_grads(chunk, with_wpo):
    """Logits on the response window only (train.logits_on_responses): same log-probs, token
    counts, WPO terms and parameter gradients as the full [B, T, V] path."""
    from alignshift.forward import make_logits_fn

    graphdef, params, rest = _tiny_llama()
    ids, am, lm = _ragged_rows(np.random.RandomState(3))

    def run(window):
        fn = make_logits_fn(graphdef, rest, logits_chunk=chunk, response_window=window)

        def f(p):
            out = fn.sequence_logps(p, ids, am, lm, with_wpo)
            return out[0].sum() + (out[2].sum() if with_wpo else 0.0), out

        return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

    (_, full), g_full = run(0)
    (_, win), g_win = run(5)  # the longest response has 5 tokens
    for x, y in zip(full, win):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-5)
    for x, y in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_win)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)


def test_response_window_too_short_is_nan_not_truncated():
    from alignshift.forward import make_logits_fn

    graphdef, params, rest = _tiny_llama()
    ids, am, lm = _ragged_rows(np.random.RandomState(3))
    s_full, n_full = jax.jit(make_logits_fn(graphdef, rest).sequence_logps)(params, ids, am, lm)
    s, n = jax.jit(make_logits_fn(graphdef, rest, response_window=4).sequence_logps)(params, ids, am, lm)
    too_long = np.asarray(lm).sum(1) > 4  # rows 1 and 3 (5 response tokens)
    assert too_long.tolist() == [False, True, False, True, False]
    assert np.all(np.isnan(np.asarray(s)[too_long]))
    np.testing.assert_allclose(np.asarray(s)[~too_long], np.asarray(s_full)[~too_long], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(n), np.asarray(n_full))
    with pytest.raises(ValueError, match="response_window"):
        make_logits_fn(graphdef, rest, response_window=-1)


def test_preference_step_with_response_window_matches():
    rs = np.random.RandomState(1)
    batch = {}
    for g in ("chosen", "rejected"):
        ids, am, lm = _ragged_rows(rs)
        batch.update({f"{g}_input_ids": ids, f"{g}_attention_mask": am, f"{g}_loss_mask": lm})
    _assert_step_matches(batch, response_window=6)
