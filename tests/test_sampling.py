"""Tests for batched jitted sampling (alignshift.models.sampling.generate)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models import sampling
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.models.sampling import generate, top_p_filter

V = 61
PAD = 0
N_NEW = 6


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))


PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [8, 4, 22, 17], [30]]


def _left_pad(prompts, width=None, pad=PAD):
    P = width or max(map(len, prompts))
    ids = np.full((len(prompts), P), pad, np.int32)
    mask = np.zeros((len(prompts), P), np.int32)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = p
        mask[i, P - len(p):] = 1
    return jnp.asarray(ids), jnp.asarray(mask)


_fwd = nnx.jit(lambda m, ids: m(ids))


def _reference_greedy(model, prompt, n_new, eos_id=None):
    """Plain-Python step-by-step argmax on a single unpadded prompt."""
    seq = list(prompt)
    out = []
    for _ in range(n_new):
        logits = _fwd(model, jnp.asarray([seq], jnp.int32))
        tok = int(jnp.argmax(logits[0, -1]))
        out.append(tok)
        seq.append(tok)
        if eos_id is not None and tok == eos_id:
            break
    return out


def test_greedy_matches_reference_loop(model):
    ids, mask = _left_pad(PROMPTS)
    toks, rmask = generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=N_NEW,
                           eos_id=None, pad_id=PAD, greedy=True)
    assert toks.shape == (4, N_NEW) and toks.dtype == jnp.int32 and rmask.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(rmask), 1)
    for i, p in enumerate(PROMPTS):
        assert list(np.asarray(toks[i])) == _reference_greedy(model, p, N_NEW)
    # temperature == 0 also means greedy
    toks0, _ = generate(model, ids, mask, key=jax.random.key(1), max_new_tokens=N_NEW,
                        eos_id=None, pad_id=PAD, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(toks0), np.asarray(toks))


def test_left_padding_does_not_change_continuation(model):
    alone = []
    for p in PROMPTS:
        ids, mask = _left_pad([p])
        t, _ = generate(model, ids, mask, key=None, max_new_tokens=N_NEW, eos_id=None,
                        pad_id=PAD, greedy=True)
        alone.append(np.asarray(t[0]))
    ids, mask = _left_pad(PROMPTS, width=8, pad=PAD + 3)  # extra padding, different pad token id
    batched, _ = generate(model, ids, mask, key=None, max_new_tokens=N_NEW, eos_id=None,
                          pad_id=PAD + 3, greedy=True)
    np.testing.assert_array_equal(np.asarray(batched), np.stack(alone))


def test_eos_stops_row(model):
    ids, mask = _left_pad(PROMPTS)
    free, _ = generate(model, ids, mask, key=None, max_new_tokens=N_NEW, eos_id=None,
                       pad_id=PAD, greedy=True)
    free = np.asarray(free)
    eos = int(free[0, 2])
    toks, rmask = generate(model, ids, mask, key=None, max_new_tokens=N_NEW, eos_id=eos,
                           pad_id=PAD, greedy=True)
    toks, rmask = np.asarray(toks), np.asarray(rmask)
    for i in range(len(PROMPTS)):
        hits = np.nonzero(free[i] == eos)[0]
        stop = hits[0] if len(hits) else N_NEW - 1
        np.testing.assert_array_equal(rmask[i], (np.arange(N_NEW) <= stop).astype(np.int32))
        np.testing.assert_array_equal(toks[i, :stop + 1], free[i, :stop + 1])
        assert np.all(toks[i, stop + 1:] == PAD)
        assert _reference_greedy(model, PROMPTS[i], N_NEW, eos_id=eos) == list(toks[i, :stop + 1])
    assert rmask[0].sum() <= 3
    # a list of eos ids works too (any of them stops)
    toks2, rmask2 = generate(model, ids, mask, key=None, max_new_tokens=N_NEW,
                             eos_id=[V + 5, eos], pad_id=PAD, greedy=True)
    np.testing.assert_array_equal(np.asarray(rmask2), rmask)
    np.testing.assert_array_equal(np.asarray(toks2), toks)


def test_sampling_determinism_and_no_recompile(model):
    ids, mask = _left_pad(PROMPTS)
    kw = dict(max_new_tokens=N_NEW, eos_id=None, pad_id=PAD, temperature=1.5, top_p=0.9)
    a = generate(model, ids, mask, key=jax.random.key(3), **kw)
    info0 = sampling._build_cached.cache_info()
    b = generate(model, ids, mask, key=jax.random.key(3), **kw)
    c = generate(model, ids, mask, key=jax.random.key(4), **{**kw, "temperature": 1.2})
    info1 = sampling._build_cached.cache_info()
    assert info1.misses == info0.misses and info1.hits == info0.hits + 2
    fn = sampling._build_cached(nnx.graphdef(model), N_NEW, (), PAD, False, True)
    assert fn._cache_size() == 1  # one compilation for all three calls
    np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
    assert not np.array_equal(np.asarray(a[0]), np.asarray(c[0]))
    assert np.all((np.asarray(a[0]) >= 0) & (np.asarray(a[0]) < V))


def test_tiny_top_p_is_greedy(model):
    ids, mask = _left_pad(PROMPTS)
    g, _ = generate(model, ids, mask, key=None, max_new_tokens=N_NEW, eos_id=None, pad_id=PAD,
                    greedy=True)
    s, _ = generate(model, ids, mask, key=jax.random.key(7), max_new_tokens=N_NEW, eos_id=None,
                    pad_id=PAD, temperature=1.0, top_p=1e-6)
    np.testing.assert_array_equal(np.asarray(s), np.asarray(g))


def _tv_tolerance(probs, n):
    # ~3x the expected total-variation distance of an n-sample empirical distribution
    return 1.5 * np.sum(np.sqrt(2 * probs * (1 - probs) / (np.pi * n))) + 0.01


def test_sampling_follows_softmax(model):
    B = 1024
    ids, mask = _left_pad([[5, 9, 13]] * B)
    toks, _ = generate(model, ids, mask, key=jax.random.key(11), max_new_tokens=1, eos_id=None,
                       pad_id=PAD, temperature=0.5)
    probs = np.asarray(jax.nn.softmax(_fwd(model, ids[:1])[0, -1] / 0.5), np.float64)
    emp = np.bincount(np.asarray(toks[:, 0]), minlength=V) / B
    assert 0.5 * np.abs(emp - probs).sum() < _tv_tolerance(probs, B)


def test_sample_logits_temperature_and_top_p():
    n = 4000
    logits = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))[None].repeat(n, 0)
    keys = jax.random.key(0)
    s = sampling.sample_logits(logits, keys, temperature=1.0, top_p=0.7, greedy=False, use_top_p=True)
    emp = np.bincount(np.asarray(s), minlength=4) / n
    want = np.array([0.625, 0.375, 0, 0])
    assert emp[2] == 0 and emp[3] == 0
    assert 0.5 * np.abs(emp - want).sum() < _tv_tolerance(want, n)
    s = sampling.sample_logits(logits, keys, temperature=2.0, top_p=1.0, greedy=False, use_top_p=False)
    emp = np.bincount(np.asarray(s), minlength=4) / n
    want = np.sqrt([0.5, 0.3, 0.15, 0.05])
    want /= want.sum()
    assert 0.5 * np.abs(emp - want).sum() < _tv_tolerance(want, n)


def test_top_p_filter_reference():
    rs = np.random.RandomState(0)
    logits = rs.randn(5, 13).astype(np.float32) * 2
    for top_p in (0.05, 0.3, 0.7, 0.95):
        out = np.asarray(top_p_filter(jnp.asarray(logits), top_p))
        for row, orow in zip(logits, out):
            p = np.exp(row - row.max())
            p /= p.sum()
            order = np.argsort(-p)
            keep = set()
            mass = 0.0
            for j in order:  # smallest prefix with mass >= top_p
                keep.add(j)
                mass += p[j]
                if mass >= top_p:
                    break
            kept = set(np.nonzero(np.isfinite(orow))[0])
            assert kept == keep
            np.testing.assert_array_equal(orow[list(kept)], row[list(kept)])
