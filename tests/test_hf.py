"""HF folder import/export: logits parity with transformers, round trip, clear errors."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from alignshift.models.hf import load_hf_model, load_hf_tokenizer, save_hf_model

V = 97


def _tiny_configs():
    yield "llama", transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2)
    yield "gemma", transformers.GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    yield "gemma2", transformers.Gemma2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                              sliding_window=4, attn_logit_softcapping=5.0,
                                              final_logit_softcapping=3.0, query_pre_attn_scalar=8)


    yield "gpt_neox", transformers.GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25)
    yield "gpt2", transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)


def _randomise(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return model


def _batch():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, V, (3, 9))  # longer than Gemma 2's sliding window
    mask = np.ones((3, 9), np.int32)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    return ids, mask


def _torch_logits(m, ids, mask):
    pos = np.clip(np.cumsum(mask, -1) - 1, 0, None)
    with torch.no_grad():
        return m(torch.tensor(ids), attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos),
                 use_cache=False).logits.float().numpy()


@pytest.fixture(scope="module", params=list(_tiny_configs()), ids=lambda p: p[0])
def hf_folder(request, tmp_path_factory):
    name, cfg = request.param
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    m = _randomise(transformers.AutoModelForCausalLM.from_config(cfg).eval())
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(d, max_shard_size="30KB")  # several shards + index
    assert os.path.exists(d / "model.safetensors.index.json")
    return d, m


def test_import_logits_match_transformers(hf_folder):
    d, m = hf_folder
    ids, mask = _batch()
    ours = np.asarray(load_hf_model(str(d))(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    ref = _torch_logits(m, ids, mask)
    assert ours.shape == ref.shape == (3, 9, V)
    err = np.abs(ours - ref)[mask == 1].max() / np.abs(ref).max()
    assert err < 1e-4


def test_export_round_trip_loads_in_transformers(hf_folder, tmp_path):
    d, m = hf_folder
    ours = load_hf_model(str(d))
    save_hf_model(ours, str(tmp_path))
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="eager").eval()
    ids, mask = _batch()
    np.testing.assert_allclose(_torch_logits(back, ids, mask)[mask == 1], _torch_logits(m, ids, mask)[mask == 1],
                               atol=1e-5)


def test_bf16_params_and_compute(hf_folder):
    d, _ = hf_folder
    model = load_hf_model(str(d), dtype=jnp.bfloat16)
    from flax import nnx
    import jax
    assert {x.dtype for x in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))} == {jnp.dtype(jnp.bfloat16)}
    ids, mask = _batch()
    out = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))


def test_unsupported_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match=r"unsupported model_type 'mamba'; supported: \["):
        load_hf_model(str(tmp_path))


def test_missing_weights_are_named(hf_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    d, _ = hf_folder
    sd = {}
    for f in os.listdir(d):
        if f.endswith(".safetensors"):
            sd.update(load_file(str(d / f)))
    victim = sorted(k for k in sd if ".layers.1." in k or ".h.1." in k)[0]
    sd.pop(victim)
    sd["model.extra.weight"] = np.zeros(3, np.float32)
    save_file(sd, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((d / "config.json").read_text())
    with pytest.raises(KeyError) as e:
        load_hf_model(str(tmp_path))
    assert f"'{victim}'" in str(e.value) and "'model.extra.weight'" in str(e.value)


def test_no_weights_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_hf_model(str(tmp_path))


def test_tokenizer_with_chat_template_from_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", "user", "assistant", "hello", "hi", ":"])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} "
                          "{% endfor %}{% if add_generation_prompt %}assistant : {% endif %}")
    fast.save_pretrained(tmp_path)
    tok = load_hf_tokenizer(str(tmp_path))
    text = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True)
    assert text == "<bos>user : hello assistant : "
    ids = tok(text, add_special_tokens=False, return_tensors="np")["input_ids"][0]
    assert ids[0] == vocab["<bos>"] and list(ids).count(vocab["<bos>"]) == 1  # no double BOS


def test_trainer_runs_an_hf_model_via_config(hf_folder):
    """model.hf_path: the trainer builds the policy from the folder; first DPO step = ln 2."""
    import math

    from alignshift.config import MethodConfig, load_config
    from alignshift.data import BatchIterator, encode_pairs, make_scenario
    from alignshift.train.optim import make_optimizer
    from alignshift.train.phases import build_policy, objective_for, precompute_reference_logps
    from alignshift.forward import make_logits_fn, split_model
    from alignshift.train.steps import init_state, make_preference_step

    d, _ = hf_folder
    if not d.name.startswith(("llama", "gpt_neox")):
        pytest.skip("one decoder family per layout suffices here (CI time)")
    cfg = load_config(None, [f"model.hf_path={d}", "train.batch_size=4"])
    data = make_scenario("deploy_shift", seed=0, n_train=16, n_test=4, n_sft=8)
    model = build_policy(cfg.model, data.tokenizer, seed=0)
    g, params, rest = split_model(model)
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=8, max_completion_len=10)
    arrays = {k: v for k, v in arrays.items() if k.split("_")[0] in ("chosen", "rejected")}
    arrays.update(precompute_reference_logps(make_logits_fn(g, rest), params, arrays))
    tx = make_optimizer(cfg.train.optim, 2)
    step = make_preference_step(g, rest, tx, objective_for(MethodConfig()))
    _, m = step(init_state(params, tx), BatchIterator(arrays, 4, seed=0).batch_at(0), None)
    assert float(m["loss"]) == pytest.approx(math.log(2.0), abs=1e-6)
