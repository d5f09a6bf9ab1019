"""The one attention function of every model (alignshift.models.layers.attention) against the float32
einsum path it replaced and an independent float64 NumPy reference: causal, padded, packed
(segments), shared-prompt (branches), sliding windows (by index and by position), soft-capped,
grouped-query / multi-query / multi-head; and the masks and layouts the models build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignshift.models.layers import (MASK_VALUE, attention, causal_padding_mask, positions_from_segments,
                                      segment_mask, sliding_window_mask, token_layout)


# ------------------------------------------------------------------ the old path (frozen copies)

def old_grouped_query_attention(q, k, v, mask, scale, dtype, logit_cap=None):
    """layers.grouped_query_attention before the attention functions were merged (verbatim maths)."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    q = q.astype(dtype).reshape(B, T, KV, H // KV, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(dtype), preferred_element_type=jnp.float32)
    if logit_cap is not None:
        scores = jnp.tanh(scores * scale / logit_cap) * logit_cap
    else:
        scores = scores * scale
    probs = jax.nn.softmax(jnp.where(mask[:, :, None], scores.astype(jnp.float32), MASK_VALUE), axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(dtype), v.astype(dtype))
    return out.reshape(B, T, H * D)


def old_dot_product_attention(q, k, v, mask, scale, dtype):
    """layers.dot_product_attention (multi-head) before the merge."""
    B, T, H, D = q.shape
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(dtype), k.astype(dtype), preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(mask, scores.astype(jnp.float32), MASK_VALUE), axis=-1)
    out = jnp.einsum("bhts,bshd->bthd", probs.astype(dtype), v.astype(dtype))
    return out.reshape(B, T, H * D)


def numpy_attention(q, k, v, allowed, scale, logit_cap=None):
    """float64 reference: per batch row, head and query, a softmax over the allowed keys."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, D = q.shape
    G = H // k.shape[2]
    out = np.zeros((B, T, H, D))
    for b in range(B):
        for h in range(H):
            s = q[b, :, h] @ k[b, :, h // G].T * scale
            if logit_cap is not None:
                s = np.tanh(s / logit_cap) * logit_cap
            s = np.where(allowed[b], s, -np.inf)
            for t in range(T):
                if not allowed[b, t].any():
                    continue  # a padding query: any finite output
                p = np.exp(s[t] - s[t].max())
                out[b, t, h] = (p / p.sum()) @ v[b, :, h // G]
    return out.reshape(B, T, H * D)


def qkv(B=2, T=10, H=4, KV=2, D=8, seed=0, dtype=jnp.float32):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=s), dtype) for s in ((B, T, H, D), (B, T, KV, D), (B, T, KV, D)))


# a packed row of two sequences and one shared-prompt group, and a padded batch
SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 2, 0, 0],
                [1, 1, 1, 1, 1, 1, 1, 1, 1, 0]], np.int32)
BRANCH = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                   [0, 0, 0, 1, 1, 1, 2, 2, 2, 0]], np.int32)  # row 1: prompt 3 | chosen 3 | rejected 3
POS = np.array([[0, 1, 2, 0, 1, 2, 3, 4, 0, 0],
                [0, 1, 2, 3, 4, 5, 3, 4, 5, 0]], np.int32)
PAD = np.array([[1] * 7 + [0] * 3, [0] * 2 + [1] * 8], np.int32)  # right- and left-padded


def brute_force_mask(seg, br, pos, window=None):
    B, T = seg.shape
    m = np.zeros((B, T, T), bool)
    for b in range(B):
        for i in range(T):
            for j in range(T):
                m[b, i, j] = (seg[b, i] == seg[b, j] != 0 and j <= i and (br[b, j] == 0 or br[b, j] == br[b, i])
                              and (window is None or pos[b, i] - pos[b, j] < window))
    return m


@pytest.mark.parametrize("window", [None, 2])
def test_segment_mask_is_the_rule(window):
    got = np.asarray(segment_mask(jnp.asarray(SEG), jnp.asarray(POS), jnp.asarray(BRANCH), window))[:, 0]
    np.testing.assert_array_equal(got, brute_force_mask(SEG, BRANCH, POS, window))
    # the rejected token at index 6 (position 3) sees the prompt, not the chosen tokens 3..5
    if window is None:
        assert got[1, 6].tolist() == [True, True, True, False, False, False, True, False, False, False]
    else:  # window by position: prompt index 2 (position 2, 4 indices back) stays visible
        assert got[1, 6].tolist() == [False, False, True, False, False, False, True, False, False, False]
    pos = np.asarray(positions_from_segments(jnp.asarray(SEG)))
    np.testing.assert_array_equal(pos[0][SEG[0] > 0], POS[0][SEG[0] > 0])  # restarts per segment
    np.testing.assert_array_equal(pos[1][:9], np.arange(9))


CASES = {  # name -> (mask builder or None, kv heads, logit cap)
    "causal": (None, 2, None),
    "padded": (lambda: causal_padding_mask(jnp.asarray(PAD)), 2, None),
    "segment": (lambda: segment_mask(jnp.asarray(SEG), jnp.asarray(POS)), 2, None),
    "shared_prompt": (lambda: segment_mask(jnp.asarray(SEG), jnp.asarray(POS), jnp.asarray(BRANCH)), 2, None),
    "sliding_index": (lambda: sliding_window_mask(jnp.asarray(PAD), 3), 2, None),
    "sliding_position": (lambda: segment_mask(jnp.asarray(SEG), jnp.asarray(POS), jnp.asarray(BRANCH), 3), 1, None),
    "softcap": (lambda: causal_padding_mask(jnp.asarray(PAD)), 2, 1.5),
    "mha": (lambda: segment_mask(jnp.asarray(SEG), jnp.asarray(POS)), 4, None),
    "mqa_shared_softcap": (lambda: segment_mask(jnp.asarray(SEG), jnp.asarray(POS), jnp.asarray(BRANCH)), 1, 2.0),
}


def _dense(build, T=10, B=2):
    return jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, 1, T, T)) if build is None else build()


@pytest.mark.parametrize("name", sorted(CASES))
def test_attention_equals_old_float32_path(name):
    build, KV, cap = CASES[name]
    q, k, v = qkv(KV=KV, seed=len(name))
    mask, dense = (None if build is None else build()), _dense(build)
    want = old_grouped_query_attention(q, k, v, dense, 0.3, jnp.float32, cap)
    impls = ("xla", "auto") if cap is not None else ("xla", "auto", "jax")
    for impl in impls:
        got = attention(q, k, v, mask, causal=True, scale=0.3, dtype=jnp.float32, logit_cap=cap, implementation=impl)
        real = np.asarray(dense[:, 0].any(-1))  # queries that see something (padding queries: any output)
        np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-6,
                                   err_msg=impl)
        assert np.all(np.isfinite(np.asarray(got)))
    if KV == 4:
        np.testing.assert_allclose(np.asarray(want), np.asarray(old_dot_product_attention(q, k, v, dense, 0.3,
                                                                                          jnp.float32)),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["shared_prompt", "sliding_position", "mqa_shared_softcap", "padded"])
def test_attention_equals_float64_numpy(name):
    build, KV, cap = CASES[name]
    q, k, v = qkv(KV=KV, seed=7)
    mask = build()
    got = np.asarray(attention(q, k, v, mask, causal=True, scale=0.3, dtype=jnp.float32, logit_cap=cap))
    allowed = np.asarray(mask)[:, 0]
    want = numpy_attention(q, k, v, allowed, 0.3, cap)
    real = allowed.any(-1)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)


def test_causal_window_without_mask_and_gradients():
    """``mask=None, causal=True, window=W`` (a sliding layer without padding) equals the index
    window mask, and the gradients of the fused-argument path equal the float32 path's."""
    q, k, v = qkv(seed=3)
    dense = sliding_window_mask(jnp.ones((2, 10), jnp.int32), 4)
    want = old_grouped_query_attention(q, k, v, dense, 0.3, jnp.float32)
    for impl in ("xla", "jax"):
        got = attention(q, k, v, None, causal=True, window=4, scale=0.3, dtype=jnp.float32, implementation=impl)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)

    def loss(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, segment_mask(jnp.asarray(SEG), jnp.asarray(POS),
                                                                                 jnp.asarray(BRANCH)),
                                                         causal=True, scale=0.3, dtype=jnp.float32,
                                                         implementation=impl)))

    g_x, g_j = (jax.grad(loss(i), argnums=(0, 1, 2))(q, k, v) for i in ("xla", "jax"))
    for a, b in zip(g_x, g_j):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_bfloat16_paths_agree():
    q, k, v = qkv(dtype=jnp.bfloat16, seed=4)
    mask = segment_mask(jnp.asarray(SEG), jnp.asarray(POS), jnp.asarray(BRANCH))
    x = attention(q, k, v, mask, causal=True, scale=0.3, dtype=jnp.bfloat16, implementation="xla")
    j = attention(q, k, v, mask, causal=True, scale=0.3, dtype=jnp.bfloat16, implementation="jax")
    old = old_grouped_query_attention(q, k, v, mask, 0.3, jnp.bfloat16)
    assert x.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(old, np.float32))
    real = np.asarray(mask)[:, 0].any(-1)
    np.testing.assert_allclose(np.asarray(j, np.float32)[real], np.asarray(x, np.float32)[real], atol=3e-2)


def test_errors_and_layouts():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="implementation"):
        attention(q, k, v, None, causal=True, scale=1.0, dtype=jnp.float32, implementation="flash")
    with pytest.raises(ValueError, match="soft-capping"):
        attention(q, k, v, None, causal=True, scale=1.0, dtype=jnp.float32, logit_cap=2.0, implementation="jax")
    with pytest.raises(ValueError, match="causal=True"):
        attention(q, k, v, None, window=3, scale=1.0, dtype=jnp.float32)
    ones = jnp.ones((2, 10), jnp.int32)
    with pytest.raises(ValueError, match="not both"):
        token_layout((2, 10), attention_mask=ones, segment_ids=ones)
    with pytest.raises(ValueError, match="explicit positions"):
        token_layout((2, 10), segment_ids=ones, branch_ids=ones)
    with pytest.raises(ValueError, match="need segment_ids"):
        token_layout((2, 10), branch_ids=ones)
    with pytest.raises(ValueError, match="shape"):
        token_layout((2, 10), segment_ids=ones[:, :5])
    lay = token_layout((2, 10), segment_ids=jnp.asarray(SEG))
    np.testing.assert_array_equal(np.asarray(lay.positions)[0][:8], POS[0][:8])  # restart per segment by default
    assert token_layout((2, 10)).mask() is None  # plain causal: no mask tensor
    np.testing.assert_array_equal(np.asarray(token_layout((2, 10), attention_mask=jnp.asarray(PAD)).mask(3)),
                                  np.asarray(sliding_window_mask(jnp.asarray(PAD), 3)))
