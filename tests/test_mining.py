"""Pair mining and FLR-LM feedback SFT (alignshift.rewards.mining)."""

import jax
import numpy as np
import pytest
from flax import nnx

from alignshift.data import WordTokenizer, encode_pairs, validate_examples
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.rewards import mining
from alignshift.rewards.flr import FT_INSTRUCTION


def test_mine_pairs_max_vs_min_with_gap():
    prompts = ["a", "b", "c", "d"]
    responses = [["x", "y", "z"], ["u", "v", "w"], ["s", "s", "t"], ["q", "r", "q"]]
    scores = np.array([[0.1, 0.9, -0.3], [0.2, 0.2, 0.2], [1.0, 0.0, 0.5], [0.0, 0.05, 0.1]])
    pairs = mining.mine_pairs(prompts, responses, scores)
    # b: all tied (gap 0) -> skipped; d: max "q" (idx 2) vs min "q" (idx 0), identical text -> skipped
    # c: max idx 0 "s", min idx 1 "s": identical texts too -> skipped
    assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [("a", "y", "z")]
    assert pairs[0].meta["gap"] == pytest.approx(1.2) and pairs[0].meta["prompt_index"] == 0
    validate_examples(pairs)  # valid rows for the trainer
    assert mining.mine_pairs(prompts, responses, scores, min_gap=1.5) == []
    scores2 = np.array([[0.1, 0.9, -0.3], [0.0, 0.3, 0.2], [1.0, 0.0, 0.5], [0.0, 0.05, 0.1]])
    resp2 = [["x", "y", "z"], ["u", "v", "w"], ["s", "t", "u"], ["q", "r", "s"]]
    got = mining.mine_pairs(prompts, resp2, scores2, min_gap=0.2)
    assert [(p.prompt, p.chosen, p.rejected) for p in got] == [("a", "y", "z"), ("b", "v", "u"), ("c", "s", "t")]
    # an empty sample is never chosen or rejected (it cannot be trained on)
    got = mining.mine_pairs(["a"], [["x", "", "z", "w"]], [[0.5, -9.0, 0.1, 0.3]])
    assert [(p.chosen, p.rejected) for p in got] == [("x", "z")]
    kto = mining.kto_examples(prompts, resp2, scores2, min_gap=0.2)
    assert [(k["prompt"], k["completion"], k["label"]) for k in kto] == [
        ("a", "y", True), ("a", "z", False), ("b", "v", True), ("b", "u", False), ("c", "s", True), ("c", "t", False)]
    # against a brute-force reference on random data
    rs = np.random.RandomState(0)
    sc = rs.randn(30, 5)
    resp = [[f"r{i}_{j}" for j in range(5)] for i in range(30)]
    got = mining.mine_pairs([f"p{i}" for i in range(30)], resp, sc, min_gap=1.0)
    want = [i for i in range(30) if sc[i].max() - sc[i].min() >= 1.0]
    assert [g.meta["prompt_index"] for g in got] == want
    for g in got:
        i = g.meta["prompt_index"]
        assert g.chosen == resp[i][sc[i].argmax()] and g.rejected == resp[i][sc[i].argmin()]
    with pytest.raises(ValueError, match="row 1: non-finite score"):
        mining.mine_pairs(["a", "b"], [["x", "y"], ["x", "y"]], [[0, 1], [np.nan, 1]])
    with pytest.raises(ValueError, match=r"scores must be \[len\(prompts\)=2"):
        mining.mine_pairs(["a", "b"], [["x", "y"], ["x", "y"]], [0, 1])


def test_sample_score_mine_encode():
    words = ["user:", "assistant:", "hi", "yo", "a", "b", "c"]
    tok = WordTokenizer(words)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, initializer_range=0.5)
    m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    prompts = ["user: hi assistant:", "user: yo assistant:", "user: hi yo assistant:"]
    kw = dict(n_samples=4, key=jax.random.key(0), max_new_tokens=5, max_prompt_len=6, batch_size=5)
    a = mining.sample_responses(m, tok, prompts, **kw)
    assert len(a) == 3 and all(len(r) == 4 for r in a)
    assert a == mining.sample_responses(m, tok, prompts, **kw)  # deterministic given the key
    assert len({r for rs in a for r in rs}) > 3  # actually sampled
    for rs in a:
        for r in rs:
            assert all(w in tok.vocab for w in r.split()) and "<eos>" not in r.split()
    s = mining.score_responses(m, tok, prompts, a, reward="direct", batch_size=4)
    assert s.shape == (3, 4) and np.all(np.isfinite(s))
    pairs = mining.mine_pairs(prompts, a, s)
    enc = encode_pairs(tok, pairs, max_prompt_len=6, max_completion_len=6)
    assert enc["chosen_input_ids"].shape[0] == len(pairs) >= 1


def test_feedback_sft_masks_assistant_turns_only_and_learns():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<t>", "</t>", "user", "assistant", "q1", "q2", "ans", "great",
             "bad"] + [w for w in FT_INSTRUCTION.split()]
    vocab = {w: i for i, w in enumerate(dict.fromkeys(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<t> {{ m['role'] }} {{ m['content'] }} </t> "
                        "{% endfor %}{% if add_generation_prompt %}<t> assistant {% endif %}")
    ex = [("q1", "ans", "great"), ("q2", "ans ans", "bad")]
    arr = mining.feedback_sft_arrays(hf, ex, max_len=32)
    inv = {i: w for w, i in vocab.items()}
    row = [inv[int(i)] for i, a in zip(arr["input_ids"][0], arr["attention_mask"][0]) if a]
    assert " ".join(row) == f"<bos> <t> user {FT_INSTRUCTION} </t> <t> assistant q1 </t> <t> user ans </t> " \
                            f"<t> assistant great </t>"
    trained = [inv[int(i)] for i, m in zip(arr["input_ids"][0], arr["loss_mask"][0]) if m]
    assert trained == ["q1", "</t>", "great", "</t>"]  # assistant content + turn end, nothing else
    with pytest.raises(ValueError, match="row 1: conversation has"):
        mining.feedback_sft_arrays(hf, ex, max_len=27)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    hist = mining.run_feedback_sft(m, hf, ex * 4, steps=30, batch_size=8, lr=3e-2, max_len=32)
    assert hist[-1]["loss"] < 0.5 * hist[0]["loss"]
