"""Chat-template tokenisation, prompt masking, truncation and length bucketing."""

import numpy as np
import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from alignshift.data import DataError, PreferenceExample
from alignshift.data.chat import LengthBucketIterator, encode_chat_pairs, sequence_lengths
from alignshift.data.encode import PAIR_KEYS

WORDS = ["<pad>", "<bos>", "<eos>", "<unk>", "<start>", "<eot>", "user", "assistant", "system", ":",
         "hi", "hello", "there", "how", "are", "you", "fine", "bad", "be", "nice", "Human", "Assistant",
         "one", "two", "three", "four", "five", "six", "seven", "eight"]
VOCAB = {w: i for i, w in enumerate(WORDS)}
TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start> {{ m['role'] }} : {{ m['content'] }} <eot> {% endfor %}"
            "{% if add_generation_prompt %}<start> assistant : {% endif %}")


def _tok(template=TEMPLATE):
    tk = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    if template:
        fast.chat_template = template
    return fast


def ids(text):  # independent reference: whitespace words -> vocabulary ids
    return [VOCAB.get(w, VOCAB["<unk>"]) for w in text.split()]


def _row(arrays, group, i):
    x, am, lm = (arrays[f"{group}_{k}"][i] for k in ("input_ids", "attention_mask", "loss_mask"))
    n = int(am.sum())
    return list(x[:n]), list(x[lm == 1]), x, am, lm


def test_chat_layout_and_prompt_masking():
    tok = _tok()
    exs = [PreferenceExample("how are you", "fine", "bad"),
           PreferenceExample("hi", "hello there", "bad",
                             {"prompt_messages": [{"role": "user", "content": "hello"},
                                                  {"role": "assistant", "content": "hi"},
                                                  {"role": "user", "content": "hi"}]})]
    a = encode_chat_pairs(tok, exs, max_prompt_len=24, max_completion_len=6)
    assert set(a) == set(PAIR_KEYS) and a["chosen_input_ids"].shape == (2, 30)
    full, resp, x, am, lm = _row(a, "chosen", 0)
    prompt = ids("<bos> <start> user : how are you <eot> <start> assistant :")
    assert full == prompt + ids("fine <eot>")
    assert resp == ids("fine <eot>")  # end-of-turn learned, prompt never in the loss
    assert lm[: len(prompt)].sum() == 0 and (x[len(full):] == VOCAB["<pad>"]).all() and am[len(full):].sum() == 0
    assert full.count(VOCAB["<bos>"]) == 1
    full1, resp1, *_ = _row(a, "chosen", 1)
    assert full1 == ids("<bos> <start> user : hello <eot> <start> assistant : hi <eot> <start> user : hi <eot> "
                        "<start> assistant : hello there <eot>")
    assert _row(a, "rejected", 1)[1] == ids("bad <eot>")
    # kl (TRL's mix, the default): prompt i with example i-1's chosen (even i) or rejected (odd i) response
    assert _row(a, "kl", 1)[1] == ids("bad <eot>") and _row(a, "kl", 0)[1] == ids("hello there <eot>")
    assert _row(a, "kl", 1)[0][:len(_row(a, "chosen", 1)[0]) - 3] == _row(a, "chosen", 1)[0][:-3]  # its own prompt
    old = encode_chat_pairs(tok, exs, max_prompt_len=24, max_completion_len=6, kl_pairing="previous_chosen")
    assert _row(old, "kl", 1)[1] == ids("fine <eot>") and _row(old, "kl", 0)[1] == ids("hello there <eot>")
    with pytest.raises(ValueError, match="unknown kl_pairing"):
        encode_chat_pairs(tok, exs, max_prompt_len=24, max_completion_len=6, kl_pairing="next")
    # prompt_ids: left-padded prompt
    pid, pm = a["prompt_ids"][0], a["prompt_mask"][0]
    assert list(pid[pm == 1]) == prompt and pm[: 24 - len(prompt)].sum() == 0


def test_system_prompt_and_truncation():
    tok = _tok()
    long_prompt = " ".join(["one", "two", "three", "four", "five", "six"] * 3)
    long_resp = "one two three four five six seven eight"
    ex = PreferenceExample(long_prompt, long_resp, "bad")
    a, info = encode_chat_pairs(tok, [ex], max_prompt_len=8, max_completion_len=4, system_prompt="be nice",
                                return_info=True)
    full, resp, *_ = _row(a, "chosen", 0)
    untrunc = ids(f"<bos> <start> system : be nice <eot> <start> user : {long_prompt} <eot> <start> assistant :")
    assert full[:8] == [VOCAB["<bos>"]] + untrunc[-7:]  # keep BOS + the END of the prompt
    assert resp == ids("one two three four")  # keep the START of the response (no <eot>)
    assert _row(a, "rejected", 0)[1] == ids("bad <eot>")
    assert info["prompt_truncated"] == 1 and info["responses_truncated"] == 1
    assert info["prompt_len_max"] == len(untrunc) and info["response_len_max"] == 9


def test_raw_mode_and_fallbacks():
    tok = _tok()
    ex = PreferenceExample("\n\nHuman: hi\n\nAssistant:", "hello", "bad", {"raw_prompt": True})
    a = encode_chat_pairs(tok, [ex], max_prompt_len=6, max_completion_len=3)
    full, resp, *_ = _row(a, "chosen", 0)
    assert full == ids("<bos> Human: hi Assistant: hello <eos>") and resp == ids("hello <eos>")
    # no chat template: auto falls back to raw; chat mode refuses
    plain = _tok(template=None)
    b = encode_chat_pairs(plain, [PreferenceExample("hi", "hello", "bad")], max_prompt_len=4, max_completion_len=3)
    assert _row(b, "chosen", 0)[0] == ids("<bos> hi hello <eos>")
    with pytest.raises(ValueError, match="no chat template"):
        encode_chat_pairs(plain, [PreferenceExample("hi", "hello", "bad")], max_prompt_len=4, max_completion_len=3,
                          mode="chat")
    # a template that renders the history differently once an answer follows -> response alone + eos
    odd = _tok(template="{{ bos_token }}{% if add_generation_prompt %}<start> {% endif %}"
                        "{% for m in messages %}{{ m['content'] }} {% endfor %}")
    c = encode_chat_pairs(odd, [PreferenceExample("hi", "hello there", "bad")], max_prompt_len=4, max_completion_len=4)
    assert _row(c, "chosen", 0)[1] == ids("hello there <eos>")


def test_double_bos_is_removed():
    tok = _tok(template="{{ bos_token }}{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant : {% endif %}")
    a = encode_chat_pairs(tok, [PreferenceExample("hi", "hello", "bad")], max_prompt_len=6, max_completion_len=3)
    full = _row(a, "chosen", 0)[0]
    assert full[:2] == ids("<bos> hi") and full.count(VOCAB["<bos>"]) == 1


def test_malformed_rows_are_named():
    tok = _tok()
    good = PreferenceExample("hi", "hello", "bad")
    with pytest.raises(DataError, match=r"row 1: field 'chosen' is empty"):
        encode_chat_pairs(tok, [good, {"prompt": "hi", "chosen": " ", "rejected": "x"}], max_prompt_len=8,
                          max_completion_len=4)
    bad = PreferenceExample("hi", "hello", "bad", {"prompt_messages": [{"role": "user", "content": "hi"},
                                                                       {"role": "assistant", "content": "x"}]})
    with pytest.raises(DataError, match=r"row 1: field 'meta.prompt_messages' must end with a user turn"):
        encode_chat_pairs(tok, [good, bad], max_prompt_len=8, max_completion_len=4)
    bad2 = PreferenceExample("hi", "hello", "bad", {"prompt_messages": [{"role": "user"}]})
    with pytest.raises(DataError, match=r"row 0: field 'meta.prompt_messages' item 0"):
        encode_chat_pairs(tok, [bad2], max_prompt_len=8, max_completion_len=4)


def test_length_buckets_trim_only_padding():
    """Bucketed batches hold the same examples with only padding removed: per-sequence
    log-probs of a tiny Llama are identical to the untrimmed ones (float64 NumPy check of the
    masking), and batches group similar lengths."""
    import jax

    from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
    from alignshift.forward import batch_sequence_logps, make_logits_fn, split_model
    from flax import nnx

    tok = _tok()
    rng = np.random.default_rng(0)
    words = WORDS[10:20]
    exs = [PreferenceExample(" ".join(rng.choice(words, rng.integers(1, 12))), " ".join(rng.choice(words, rng.integers(1, 9))),
                             "bad " + " ".join(rng.choice(words, rng.integers(0, 3)))) for _ in range(24)]
    exs = [e for e in exs if e.chosen.strip() != e.rejected.strip()]
    a = encode_chat_pairs(tok, exs, max_prompt_len=24, max_completion_len=12)
    it = LengthBucketIterator(a, 4, seed=1, bucket=8, window=100)
    lengths = sequence_lengths(a)
    seen = []
    for step in range(it.steps_per_epoch):
        b, idx = it.batch_at(step), it.indices_at(step)
        seen.extend(idx.tolist())
        L = b["chosen_input_ids"].shape[1]
        assert L % 8 == 0 or L == 36
        assert L >= lengths[idx].max() and L - lengths[idx].max() < 8
        assert b["prompt_ids"].shape[1] % 8 == 0
        for k in ("chosen_input_ids", "rejected_loss_mask", "kl_attention_mask"):
            np.testing.assert_array_equal(b[k], a[k][idx][:, :L])
            assert (a[k][idx][:, L:] == 0).all()  # only padding (pad id 0, masks 0) is removed
        np.testing.assert_array_equal(b["prompt_mask"].sum(1), a["prompt_mask"][idx].sum(1))
    assert sorted(seen) == sorted(set(seen)) and len(seen) == it.steps_per_epoch * 4
    # sorted within the window: batch max-length spread is small compared with random batching
    spans = [np.ptp(lengths[it.indices_at(s)]) for s in range(it.steps_per_epoch)]
    assert np.mean(spans) <= 3
    # log-probs unchanged by trimming
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    graphdef, params, rest = split_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0)))
    fn = jax.jit(make_logits_fn(graphdef, rest))
    idx = it.indices_at(0)
    b = it.batch_at(0)
    full = batch_sequence_logps(fn, params, a["chosen_input_ids"][idx], a["chosen_attention_mask"][idx],
                                a["chosen_loss_mask"][idx])[0]
    trim = batch_sequence_logps(fn, params, b["chosen_input_ids"], b["chosen_attention_mask"], b["chosen_loss_mask"])[0]
    np.testing.assert_allclose(np.asarray(trim), np.asarray(full), rtol=1e-5, atol=1e-5)
    # independent NumPy reference of the masked sum on the trimmed batch
    logits = np.asarray(fn(params, b["chosen_input_ids"], b["chosen_attention_mask"]), np.float64)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    tgt = b["chosen_input_ids"][:, 1:]
    ref = (np.take_along_axis(lp[:, :-1], tgt[..., None], -1)[..., 0] * b["chosen_loss_mask"][:, 1:]).sum(1)
    np.testing.assert_allclose(np.asarray(trim), ref, rtol=1e-5, atol=1e-4)
    # resumable: same batches after restore
    it2 = LengthBucketIterator(a, 4, seed=1, bucket=8, window=100)
    it2.restore({"step": 2})
    np.testing.assert_array_equal(next(it2)["chosen_input_ids"], it.batch_at(2)["chosen_input_ids"])
