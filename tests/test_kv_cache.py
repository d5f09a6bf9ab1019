"""KV-cache decode (alignshift.models.sampling, Llama ``forward_cached``) equals the uncached one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models.layers import positions_from_mask
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.models.sampling import generate

V, PAD = 53, 0


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(3))


def _left_pad(prompts, width):
    ids = np.full((len(prompts), width), PAD, np.int32)
    mask = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [8, 4, 22, 17], [30]]


def test_prefill_and_steps_match_full_forward(model):
    """Logits of a prefill + chunked cached forwards equal the full no-cache forward."""
    rs = np.random.RandomState(0)
    ids, mask = _left_pad(PROMPTS, 6)
    ext = rs.randint(4, V, size=(4, 5)).astype(np.int32)
    ext_mask = np.ones((4, 5), np.int32)
    ext_mask[1, 3:] = 0  # right padding inside the appended chunk
    full_ids = jnp.concatenate([ids, jnp.asarray(ext)], 1)
    full_mask = jnp.concatenate([mask, jnp.asarray(ext_mask)], 1)
    want = np.asarray(model(full_ids, attention_mask=full_mask))
    pos = positions_from_mask(full_mask)
    cache = model.init_cache(4, 11)
    l0, cache = model.forward_cached(ids, cache=cache, index=0, key_mask=full_mask, positions=pos[:, :6])
    l1, cache = model.forward_cached(full_ids[:, 6:8], cache=cache, index=6, key_mask=full_mask, positions=pos[:, 6:8])
    l2, cache = model.forward_cached(full_ids[:, 8:], cache=cache, index=8, key_mask=full_mask, positions=pos[:, 8:])
    got = np.concatenate([np.asarray(l0), np.asarray(l1), np.asarray(l2)], 1)
    real = np.asarray(full_mask).astype(bool)
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not np.allclose(want[real][:, :5], want[real][0, :5])  # the logits do vary


def test_cached_decode_equals_uncached(model):
    ids, mask = _left_pad(PROMPTS, 7)
    kw = dict(max_new_tokens=9, eos_id=None, pad_id=PAD)
    g_c, m_c = generate(model, ids, mask, key=None, greedy=True, use_cache=True, **kw)
    g_u, m_u = generate(model, ids, mask, key=None, greedy=True, use_cache=False, **kw)
    np.testing.assert_array_equal(np.asarray(g_c), np.asarray(g_u))
    np.testing.assert_array_equal(np.asarray(m_c), np.asarray(m_u))
    # with an eos that stops rows early, and with sampling (same key -> same tokens)
    eos = int(np.asarray(g_u)[0, 2])
    stopped = []
    for extra in (dict(greedy=True), dict(temperature=1.3, top_p=0.9)):
        a = generate(model, ids, mask, key=jax.random.key(5), use_cache=True, **{**kw, "eos_id": eos}, **extra)
        b = generate(model, ids, mask, key=jax.random.key(5), use_cache=False, **{**kw, "eos_id": eos}, **extra)
        np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
        np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
        stopped.append(np.asarray(a[1]).sum() < a[1].size)
    assert stopped[0]  # greedy row 0 stops at its third token


def test_cached_decode_logits_close_to_uncached(model):
    """Teacher-force the greedy continuation: per-step cached logits vs full forward."""
    ids, mask = _left_pad(PROMPTS, 5)
    toks, rmask = generate(model, ids, mask, key=None, greedy=True, max_new_tokens=6, eos_id=None, pad_id=PAD)
    full = jnp.concatenate([ids, toks], 1)
    fmask = jnp.concatenate([mask, rmask], 1)
    want = np.asarray(model(full, attention_mask=fmask))[:, 4:-1]  # logits that chose the 6 tokens
    pos = positions_from_mask(fmask)
    cache = model.init_cache(4, 11)
    lg, cache = model.forward_cached(ids, cache=cache, index=0, key_mask=fmask, positions=pos[:, :5])
    got = [np.asarray(lg[:, -1])]
    for j in range(5, 10):
        lg, cache = model.forward_cached(full[:, j:j + 1], cache=cache, index=j, key_mask=fmask,
                                         positions=pos[:, j:j + 1])
        got.append(np.asarray(lg[:, 0]))
    np.testing.assert_allclose(np.stack(got, 1), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.stack(got, 1).argmax(-1), np.asarray(toks))


def test_model_without_cache_falls_back():
    from alignshift.models.gpt2 import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=16, n_layer=1, n_head=2, n_positions=32),
                        rngs=nnx.Rngs(0))
    ids, mask = _left_pad(PROMPTS, 5)
    a = generate(m, ids, mask, key=None, greedy=True, max_new_tokens=3, eos_id=None, pad_id=PAD)
    b = generate(m, ids, mask, key=None, greedy=True, max_new_tokens=3, eos_id=None, pad_id=PAD, use_cache=False)
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    with pytest.raises(NotImplementedError, match="no KV-cache path"):
        m.init_cache(1, 4)
