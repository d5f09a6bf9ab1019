"""Mistral = our Llama + sliding-window attention: HF folder import (logit parity with
transformers while the window is active), config translation, export back as ``mistral``,
and the KV-cache path with the window."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.models.hf import load_hf_model, save_hf_model
from alignshift.models.layers import positions_from_mask
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, T, WINDOW = 128, 12, 4  # sequences of 12 > window 4: the sliding window is active
BASE = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, sliding_window=WINDOW, max_position_embeddings=64)


@nnx.jit
def _fwd(model, ids, mask):
    return model(ids, attention_mask=mask)


def _hf_mistral(**overrides):
    cfg = transformers.MistralConfig(**{**BASE, **overrides})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = transformers.MistralForCausalLM(cfg).float().eval()
    # HF's init (std 0.02) gives near-uniform attention: larger weights make the window matter
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.2 * noise)
    return m


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (3, T))
    right = np.ones((3, T), np.int64)
    right[1, 9:] = 0
    right[2, 5:] = 0
    return ids, right, right[:, ::-1].copy()


def _torch_logits(m, ids, mask):
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 use_cache=False).logits.float().numpy()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    m = _hf_mistral()
    d = tmp_path_factory.mktemp("mistral")
    m.save_pretrained(d)
    return d, m


def test_load_hf_mistral_matches_transformers_with_active_window(folder):
    d, m = folder
    ours = load_hf_model(str(d))
    assert ours.config.model_type == "mistral" and ours.config.sliding_window == WINDOW
    ids, right, left = _batch()
    for mask in (right, left):
        ref = _torch_logits(m, ids, mask)
        got = np.asarray(_fwd(ours, jnp.asarray(ids), jnp.asarray(mask)))
        real = mask == 1
        err = np.abs(got - ref)[real].max() / max(1.0, np.abs(ref[real]).max())
        assert err < 1e-5, err
    # the window matters here: the same weights with full causal attention give other logits
    full = LlamaForCausalLM(LlamaConfig.from_hf(m.config, sliding_window=None), rngs=nnx.Rngs(0))
    nnx.update(full, nnx.state(ours, nnx.Param))
    no_window = np.asarray(_fwd(full, jnp.asarray(ids), jnp.asarray(right)))
    assert np.abs(no_window - _torch_logits(m, ids, right))[right == 1].max() > 1e-2


def test_config_translation_spellings():
    # transformers-5 object: rope in rope_parameters, explicit head_dim
    hf = transformers.MistralConfig(**{**BASE, "head_dim": 16}, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 5e5})
    ours = LlamaConfig.from_hf(hf)
    assert (ours.model_type, ours.sliding_window, ours.head_dim, ours.rope_theta, ours.rope_scaling) == \
        ("mistral", WINDOW, 16, 5e5, None)
    assert not ours.attention_bias and not ours.mlp_bias
    # Mistral-7B-v0.1's published config.json spelling (top-level rope_theta)
    with open(os.path.join(ROOT, "experiments", "configs", "models", "mistral_7b_v01", "config.json")) as f:
        c = LlamaConfig.from_hf(json.load(f))
    assert (c.model_type, c.sliding_window, c.num_key_value_heads, c.head_dim) == ("mistral", 4096, 8, 128)
    # sliding_window: null (Mistral v0.2+) = full causal attention
    assert LlamaConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": None}).sliding_window is None
    # a Llama config never picks up a window; round trip and hash
    assert LlamaConfig.from_hf({**BASE, "model_type": "llama"}).sliding_window is None
    assert LlamaConfig.from_dict(ours.to_dict()) == ours and hash(LlamaConfig.from_dict(ours.to_dict())) == hash(ours)
    with pytest.raises(ValueError, match="needs model_type='mistral'"):
        LlamaConfig(**BASE)
    with pytest.raises(ValueError, match="sliding_window must be a positive int"):
        LlamaConfig(**{**BASE, "sliding_window": 0}, model_type="mistral")
    with pytest.raises(ValueError, match="no attention/MLP biases"):
        LlamaConfig(**BASE, model_type="mistral", attention_bias=True)


def test_export_writes_mistral_and_transformers_reloads_it(folder, tmp_path):
    d, m = folder
    save_hf_model(load_hf_model(str(d)), str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written["model_type"] == "mistral" and written["sliding_window"] == WINDOW
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    assert type(back).__name__ == "MistralForCausalLM"
    ids, right, _ = _batch()
    np.testing.assert_allclose(_torch_logits(back, ids, right)[right == 1], _torch_logits(m, ids, right)[right == 1],
                               atol=1e-5)
    # a plain Llama export stays free of Mistral keys
    llama = LlamaForCausalLM(LlamaConfig(**{**BASE, "sliding_window": None}), rngs=nnx.Rngs(0))
    save_hf_model(llama, str(tmp_path / "llama"))
    written = json.loads((tmp_path / "llama" / "config.json").read_text())
    assert written["model_type"] == "llama" and "sliding_window" not in written


def test_kv_cache_path_applies_the_window(folder):
    d, _ = folder
    model = load_hf_model(str(d))
    ids, _, left = _batch()  # left-padded prompt of 7, then 5 tokens in two cached chunks
    ids, mask = jnp.asarray(ids), jnp.asarray(left)
    want = np.asarray(model(ids, attention_mask=mask))
    pos = positions_from_mask(mask)
    cache = model.init_cache(3, T)
    outs = []
    for a, b in ((0, 7), (7, 9), (9, T)):
        lg, cache = model.forward_cached(ids[:, a:b], cache=cache, index=a, key_mask=mask, positions=pos[:, a:b])
        outs.append(np.asarray(lg))
    got = np.concatenate(outs, 1)
    real = np.asarray(left) == 1
    np.testing.assert_allclose(got[real], want[real], rtol=1e-5, atol=1e-5)
