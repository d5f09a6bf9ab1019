"""FLR scorer (alignshift.rewards.flr): follow-up lists, both modes on a hand-computed example,
batched + prefix-reused scores vs a naive per-sequence float64 computation, Direct baseline."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.data import WordTokenizer
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.rewards import flr
from alignshift.rewards.flr import FOLLOWUPS, direct_scores, flr_scores, followup_scores

DIM = "understanding"
PROMPTS = ["user: explain cooking assistant:", "user: tell about music assistant:", "user: discuss x assistant:",
           "user: explain music assistant:"]
RESPONSES = ["recipe oven recipe", "melody", "the song is so good and well", "oven"]


def _tokenizer():
    words = ["user:", "assistant:", "explain", "tell", "about", "discuss", "cooking", "music", "recipe", "oven",
             "melody", "song", "the", "is", "so", "good", "and", "well"]
    for f in FOLLOWUPS[DIM]["positive"] + FOLLOWUPS[DIM]["negative"]:
        words += [w for w in f.split() if w not in words]
    return WordTokenizer(words)


TOK = _tokenizer()


def test_followups_exact_characters():
    assert list(FOLLOWUPS) == ["understanding", "relevance", "correctness", "engagingness", "informativeness",
                               "following"]
    for d, v in FOLLOWUPS.items():
        assert len(v["positive"]) == 10 and len(v["negative"]) == 10, d
    u = FOLLOWUPS["understanding"]
    assert u["positive"][0] == "You\u2019re very clear and easy to understand."  # typographic apostrophe
    assert u["negative"][0] == "I don't think you understood my question."  # straight apostrophe
    assert u["positive"][5] == u["positive"][8] == "That makes perfect sense!"  # duplicates kept
    assert FOLLOWUPS["correctness"]["positive"][1] == FOLLOWUPS["correctness"]["positive"][8]
    assert FOLLOWUPS["informativeness"]["negative"][3] == FOLLOWUPS["informativeness"]["negative"][6]
    assert FOLLOWUPS["relevance"]["negative"][0] == "That\u2019s not really relevant here."
    assert FOLLOWUPS["following"]["negative"][-1] == "You didn't stick to my instructions."
    import alignshift.data

    with open(os.path.join(os.path.dirname(alignshift.data.__file__), "followups.json"), encoding="utf-8") as f:
        raw = json.load(f)
    assert sum(s.count("\u2019") for d in FOLLOWUPS for k in ("positive", "negative") for s in raw[d][k]) == 19
    pos, neg = flr.followups_for("all")
    assert len(pos) == len(neg) == 60
    with pytest.raises(ValueError, match="unknown"):
        flr.followups_for("helpfulness")


class ColumnBias(nnx.Module):
    """logits[b, t, :] = a for every position: log p(token j) = a_j - logsumexp(a) everywhere."""

    def __init__(self, a):
        self.a = nnx.Param(jnp.asarray(a, jnp.float32))

    def __call__(self, ids, attention_mask=None, positions=None):
        return jnp.broadcast_to(self.a[...], ids.shape + self.a.shape)


def test_hand_computed_example():
    # Only the word "sense!" has a logit (ln 3); every other token 0. Among the 20
    # understanding follow-ups, "That makes perfect sense!" (4 words) is positive #6 and #9 and
    # "That makes no sense!" (4 words) is negative #8; the rest never contain "sense!".
    V = TOK.vocab_size
    a = np.zeros(V)
    a[TOK.token_to_id("sense!")] = math.log(3)
    m = ColumnBias(a)
    lse = math.log(V - 1 + 3)
    q = math.log(3) / 4  # mean over the 4 words of a "...sense!" follow-up
    kw = dict(dimension=DIM, reuse_prefix=False, batch_size=3)
    got = {agg: flr_scores(m, TOK, PROMPTS, RESPONSES, mode="likelihood", aggregate=agg, **kw)
           for agg in ("difference", "positive", "negative")}
    np.testing.assert_allclose(got["difference"], 2 / 10 * q - 1 / 10 * q, rtol=1e-6)
    np.testing.assert_allclose(got["positive"], 2 / 10 * q - lse, rtol=1e-6)
    np.testing.assert_allclose(got["negative"], -(1 / 10 * q - lse), rtol=1e-6)
    assert got["difference"].shape == (4,) and got["difference"].dtype == np.float64
    # include_eot: the turn-end <eos> (logit 0) joins the mean -> ln3/5 instead of ln3/4
    e = flr_scores(m, TOK, PROMPTS, RESPONSES, mode="likelihood", include_eot=True, **kw)
    np.testing.assert_allclose(e, math.log(3) / 5 * (2 / 10 - 1 / 10), rtol=1e-6)
    # repo mode: the raw logits of ONE row averaged over [bos, f_1..f_n]: ln3/5 for "...sense!"
    r = {agg: flr_scores(m, TOK, PROMPTS, RESPONSES, mode="repo", aggregate=agg, **kw)
         for agg in ("difference", "positive", "negative")}
    np.testing.assert_allclose(r["difference"], math.log(3) / 5 * (2 / 10 - 1 / 10), rtol=1e-6)
    np.testing.assert_allclose(r["positive"], math.log(3) / 5 * 2 / 10, rtol=1e-6)
    np.testing.assert_allclose(r["negative"], -math.log(3) / 5 * 1 / 10, rtol=1e-6)


@pytest.fixture(scope="module")
def llama():
    cfg = LlamaConfig(vocab_size=TOK.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    return LlamaForCausalLM(cfg, rngs=nnx.Rngs(1))


def _logsoftmax64(z):
    z = np.asarray(z, np.float64)
    return z - (np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) + z.max(-1, keepdims=True))


def _naive(model, prompt, response, f):
    """One unpadded sequence per (context, follow-up); float64 log-softmax."""
    ctx = TOK.encode(f"{prompt} {response}", add_bos=True) + [TOK.eos_id]
    fi = TOK.encode(f)
    seq = ctx + [TOK.token_to_id("user:")] + fi + [TOK.eos_id]
    L = 48
    ids = np.zeros((1, L), np.int32)
    ids[0, :len(seq)] = seq  # right padding never changes earlier logits
    z = np.asarray(_fwd(model, jnp.asarray(ids)))[0, :len(seq)]
    lp = _logsoftmax64(z)
    start = len(ctx) + 1
    lik = np.mean([lp[start + j - 1, fi[j]] for j in range(len(fi))])
    rid = [TOK.bos_id] + fi
    repo = np.mean(np.asarray(z[len(seq) - len(rid)], np.float64)[rid])
    return lik, repo


_fwd = nnx.jit(lambda m, ids: m(ids))


def test_batched_prefix_reuse_matches_naive(llama):
    pos, neg = flr.followups_for(DIM)
    fs = pos + neg
    want_lik = np.array([[_naive(llama, p, r, f)[0] for f in fs] for p, r in zip(PROMPTS, RESPONSES)])
    want_repo = np.array([[_naive(llama, p, r, f)[1] for f in fs] for p, r in zip(PROMPTS, RESPONSES)])
    assert want_lik.std() > 0.05  # the example is not degenerate
    for reuse in (True, False):
        s = followup_scores(llama, TOK, PROMPTS, RESPONSES, dimension=DIM, batch_size=3, reuse_prefix=reuse)
        np.testing.assert_allclose(s["likelihood"], want_lik, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(s["repo"], want_repo, rtol=1e-5, atol=1e-5)
    d = flr_scores(llama, TOK, PROMPTS, RESPONSES, dimension=DIM, mode="likelihood", batch_size=8)
    np.testing.assert_allclose(d, want_lik[:, :10].mean(1) - want_lik[:, 10:].mean(1), rtol=1e-5, atol=1e-5)


def test_direct_matches_naive(llama):
    got = direct_scores(llama, TOK, PROMPTS, RESPONSES, batch_size=3)
    for i, (p, r) in enumerate(zip(PROMPTS, RESPONSES)):
        pi, ri = TOK.encode(p, add_bos=True), TOK.encode(r) + [TOK.eos_id]
        ids = np.zeros((1, 48), np.int32)
        ids[0, :len(pi) + len(ri)] = pi + ri
        lp = _logsoftmax64(np.asarray(_fwd(llama, jnp.asarray(ids)))[0])
        want = np.mean([lp[len(pi) + j - 1, ri[j]] for j in range(len(ri))])
        np.testing.assert_allclose(got[i], want, rtol=1e-5)


def test_hf_chat_template_rendering_and_errors():
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<pad>", "<bos>", "<eos>", "<unk>", "<t>", "</t>", "user", "assistant", "hi", "yo"]
    for f in FOLLOWUPS[DIM]["positive"] + FOLLOWUPS[DIM]["negative"] + [flr.FT_INSTRUCTION]:
        words += [w for w in f.split() if w not in words]
    vocab = {w: i for i, w in enumerate(words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = ("{{ bos_token }}{% for m in messages %}<t> {{ m['role'] }} {{ m['content'] }} </t> "
                        "{% endfor %}{% if add_generation_prompt %}<t> assistant {% endif %}")
    f = "That makes perfect sense!"
    ctx, turn, a, b, repo = flr.render_followup(hf, "hi", "yo", f)
    ids = lambda s: [vocab[w] for w in s.split()]  # noqa: E731
    assert ctx == ids("<bos> <t> user hi </t> <t> assistant yo </t>")
    assert turn == ids("<t> user That makes perfect sense! </t>") and turn[a:b] == ids(f)
    assert repo == ids(f)  # this tokenizer adds no BOS by itself
    ctx, turn, a, b, _ = flr.render_followup(hf, "hi", "yo", f, template="swapped")
    assert ctx == ids(f"<bos> <t> user {flr.FT_INSTRUCTION} </t> <t> assistant hi </t> <t> user yo </t>")
    assert turn == ids(f"<t> assistant {f} </t>")
    p, r = flr.render_direct(hf, "hi", "yo")
    assert p + r == ids("<bos> <t> user hi </t> <t> assistant yo") and r == ids("yo")
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    m = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    s = flr_scores(m, hf, ["hi", "hi yo"], ["yo", "hi"], dimension=DIM, mode="repo", template="swapped")
    assert s.shape == (2,) and np.all(np.isfinite(s))
    with pytest.raises(ValueError, match="mode must be"):
        flr_scores(m, hf, ["hi"], ["yo"], mode="paper")
    with pytest.raises(ValueError, match="aggregate must be"):
        flr_scores(m, hf, ["hi"], ["yo"], aggregate="sum")
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        flr_scores(m, hf, ["hi", "yo"], ["yo"])
    with pytest.raises(TypeError, match=r"responses\[0\]"):
        flr_scores(m, hf, ["hi"], [None])
