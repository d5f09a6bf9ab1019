"""Packed and shared-prompt batches (alignshift.data.packing, the forward stage, the training path):
the packer's layout invariants, and log-probs and parameter gradients equal to the padded
computation for every model family (fp32)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from alignshift.config import ConfigError, MethodConfig, load_config
from alignshift.data import encode_pairs, make_scenario
from alignshift.data.packing import (PackedBatchIterator, PackingError, pack_batch, packed_row_len, packing_fill,
                                     row_counts)
from alignshift.forward import make_logits_fn, policy_inputs, split_model
from alignshift.losses import make_objective
from alignshift.models.gemma import GemmaConfig, GemmaForCausalLM
from alignshift.models.gpt2 import GPT2Config, GPT2LMHeadModel
from alignshift.models.gpt_neox import GPTNeoXConfig, GPTNeoXForCausalLM
from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
from alignshift.train import phases

V, P, C = 41, 6, 5
T = P + C


def _pad_group(prompts, responses):
    ids, att, lm = (np.zeros((len(prompts), T), np.int32) for _ in range(3))
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p)], ids[i, len(p):len(p) + len(r)] = p, r
        att[i, :len(p) + len(r)] = 1
        lm[i, len(p):len(p) + len(r)] = 1
    return ids, att, lm


def make_batch(B=4, seed=0, groups=("chosen", "rejected"), K=0):
    """A right-padded batch like encode_pairs'/encode_lists' (shared prompt per example; a bos-like
    first token 1), per-example passthrough arrays, lengths varied so rows pack unevenly."""
    rng = np.random.default_rng(seed)
    prompts = [np.concatenate([[1], rng.integers(3, V, size=rng.integers(0, P))]) for _ in range(B)]
    batch = {}

    def responses():
        return [rng.integers(3, V, size=rng.integers(1, C + 1)) for _ in range(B)]

    if K:
        cols = [_pad_group(prompts, responses()) for _ in range(K)]
        for f, name in enumerate(("input_ids", "attention_mask", "loss_mask")):
            batch[f"cand_{name}"] = np.stack([c[f] for c in cols], axis=1)
        batch["cand_scores"] = rng.normal(size=(B, K)).astype(np.float32)
        batch["reference_cand_logps"] = rng.normal(size=(B, K)).astype(np.float32)
        return batch
    for g in groups:
        batch[f"{g}_input_ids"], batch[f"{g}_attention_mask"], batch[f"{g}_loss_mask"] = _pad_group(prompts,
                                                                                                      responses())
        batch[f"reference_{g}_logps"] = rng.normal(size=B).astype(np.float32)
    batch["weight"] = rng.uniform(0.5, 1.5, size=B).astype(np.float32)
    return batch


def split(batch, k, m):
    """Micro-batch m of the interleaved split (what alignshift.train.accumulate does)."""
    return {key: np.asarray(v)[m::k] for key, v in batch.items()}


def sequences(batch, g):
    """Real tokens and loss flags of every sequence of group g: [B][K] of (ids, loss)."""
    ids, att, lm = (np.asarray(batch[f"{g}_{f}"]) for f in ("input_ids", "attention_mask", "loss_mask"))
    if ids.ndim == 2:
        ids, att, lm = ids[:, None], att[:, None], lm[:, None]
    return [[(ids[i, j][att[i, j] == 1], lm[i, j][att[i, j] == 1]) for j in range(ids.shape[1])]
            for i in range(ids.shape[0])]


# ------------------------------------------------------------------ the packer's layout


@pytest.mark.parametrize("share", [False, True])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("kind", ["pairs", "kto", "lists"])
def test_layout_invariants(share, k, kind):
    """Every sequence present exactly once; each interleaved micro-batch is self-contained: its
    targets point into its own rows at the predecessor of each response token, and the rows
    reproduce every sequence (shared prompt: prompt + own response, positions as if alone)."""
    B = 6 if kind != "lists" else 4
    batch = (make_batch(B, seed=1, K=3) if kind == "lists"
             else make_batch(B, seed=1, groups=("chosen", "rejected", "kl") if kind == "kto" else ("chosen", "rejected")))
    groups = ("cand",) if kind == "lists" else tuple(g for g in ("chosen", "rejected", "kl") if f"{g}_input_ids" in batch)
    n = 3 if kind != "pairs" else 2
    L = packed_row_len(P, C, n_responses=n, share_prompt=share)
    packed = pack_batch(batch, row_len=L, target_len=C, micro_batches=k, share_prompt=share)
    R = packed["packed_input_ids"].shape[0]
    assert R % k == 0 and packed["packed_input_ids"].shape[1] == L
    units = (B // k) * (1 if share else n)
    assert R // k in row_counts(units)
    assert R < B * n  # it does pack
    for key in batch:  # passthrough arrays unchanged, token arrays consumed
        if key.endswith(("_input_ids", "_attention_mask", "_loss_mask")):
            assert key not in packed
        else:
            np.testing.assert_array_equal(packed[key], batch[key])
    assert ("packed_branch_ids" in packed) == share

    seen = 0
    for m in range(k):
        mb, pb = split(batch, k, m), split(packed, k, m)
        flat_ids = pb["packed_input_ids"].reshape(-1)
        flat_seg = pb["packed_segment_ids"].reshape(-1)
        flat_pos = pb["packed_positions"].reshape(-1)
        flat_br = pb["packed_branch_ids"].reshape(-1) if share else None
        rows_len = flat_ids.size
        for g in groups:
            seqs = sequences(mb, g)
            idx, tid, tm = (pb[f"{g}_target_{f}"] for f in ("index", "ids", "mask"))
            if idx.ndim == 2:
                idx, tid, tm = idx[:, None], tid[:, None], tm[:, None]
            for i, row in enumerate(seqs):
                for j, (ids, loss) in enumerate(row):
                    t = np.flatnonzero(loss[1:]) + 1
                    assert tm[i, j].sum() == len(t) and not tm[i, j, len(t):].any()
                    src = idx[i, j, :len(t)]
                    assert src.max() < rows_len  # local rows only
                    np.testing.assert_array_equal(tid[i, j, :len(t)], ids[t])
                    np.testing.assert_array_equal(flat_ids[src], ids[t - 1])  # the predecessor token
                    np.testing.assert_array_equal(flat_pos[src], t - 1)  # at its own position
                    assert len(set(flat_seg[src])) == 1 and flat_seg[src][0] > 0
                    if share:  # the predecessor is the prompt or this response's branch
                        assert set(flat_br[src]) <= {0, 1 + j + (groups.index(g) if g != "cand" else 0)}
                    seen += 1
        # segments: every segment's tokens, read back in order, rebuild the sequences exactly once
        rebuilt = []
        for r in range(pb["packed_input_ids"].shape[0]):
            seg, ids = pb["packed_segment_ids"][r], pb["packed_input_ids"][r]
            for s in sorted(set(seg) - {0}):
                toks = ids[seg == s]
                if not share:
                    rebuilt.append(tuple(toks))
                    continue
                br, pos = pb["packed_branch_ids"][r][seg == s], pb["packed_positions"][r][seg == s]
                prompt = toks[br == 0]
                np.testing.assert_array_equal(pos[br == 0], np.arange(len(prompt)))
                for b in sorted(set(br) - {0}):
                    np.testing.assert_array_equal(pos[br == b], len(prompt) + np.arange((br == b).sum()))
                    rebuilt.append(tuple(np.concatenate([prompt, toks[br == b]])))
        want = [tuple(ids) for g in groups for row in sequences(mb, g) for ids, _ in row]
        assert sorted(rebuilt) == sorted(want)
    assert seen == B * n


def test_overflow_and_errors_raise():
    batch = make_batch(4, seed=2)
    with pytest.raises(PackingError, match="fixed rows=1"):
        pack_batch(batch, row_len=T, rows=1)
    assert pack_batch(batch, row_len=T, rows=8)["packed_input_ids"].shape == (8, T)  # fixed shape when it fits
    with pytest.raises(PackingError, match="more than the row length"):
        pack_batch(batch, row_len=3)
    with pytest.raises(PackingError, match="more than target_len=1"):
        pack_batch(batch, row_len=T, target_len=1)
    with pytest.raises(PackingError, match="not divisible by micro_batches=3"):
        pack_batch(batch, row_len=T, micro_batches=3)
    holey = {k: v.copy() for k, v in batch.items()}
    holey["chosen_attention_mask"][0, 1] = 0
    with pytest.raises(PackingError, match="not contiguous"):
        pack_batch(holey, row_len=T)
    # without packing: one unit per row (B * 2 sequences, or B shared-prompt groups)
    assert pack_batch(batch, row_len=T, packing=False)["packed_input_ids"].shape[0] == 8
    shared = pack_batch(batch, row_len=P + 2 * C, packing=False, share_prompt=True)
    assert shared["packed_input_ids"].shape[0] == 4 and 0 < packing_fill(shared) <= 1
    assert row_counts(12) == (2, 4, 6, 8, 10, 12) and row_counts(3) == (1, 2, 3)


def test_packed_iterator_and_config_checks():
    batch = make_batch(8, seed=3)
    it = PackedBatchIterator(batch, 4, seed=0, pack_kwargs=dict(row_len=T, target_len=C, micro_batches=2))
    b0 = next(it)
    plain = phases.preference_iterator(batch, 4, seed=0)
    np.testing.assert_array_equal(b0["weight"], plain.batch_at(0)["weight"])  # same order
    assert b0["packed_input_ids"].shape[0] % 2 == 0
    with pytest.raises(ValueError, match="length_bucket"):
        phases.preference_iterator(batch, 4, seed=0, length_bucket=4, pack={"row_len": T})
    with pytest.raises(ConfigError, match="train.length_bucket"):
        load_config(None, ["train.packing=true", "train.length_bucket=8"])
    with pytest.raises(ConfigError, match="penalty 'wdpo'"):
        load_config(None, ["train.share_prompt=true", "methods=[{name: w, base: dpo, penalty: wdpo}]"])


# ------------------------------------------------------------------ log-probs and gradients per model

def _llama(**kw):
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3, **kw),
                            rngs=nnx.Rngs(0))


FAMILIES = {
    "llama": lambda: _llama(),
    "mistral_sliding": lambda: _llama(model_type="mistral", sliding_window=3),
    "gemma": lambda: GemmaForCausalLM(GemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1,
                                                  head_dim=8, initializer_range=0.3), rngs=nnx.Rngs(1)),
    "gemma2_softcap_sliding": lambda: GemmaForCausalLM(GemmaConfig(
        model_type="gemma2", vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=3, query_pre_attn_scalar=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, initializer_range=0.3), rngs=nnx.Rngs(2)),
    "gpt_neox": lambda: GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=48,
                                                         num_hidden_layers=1, num_attention_heads=4,
                                                         partial_rotary_factor=0.5, initializer_range=0.3),
                                           rngs=nnx.Rngs(3)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=32, n_layer=1, n_head=4, n_positions=2 * T,
                                               initializer_range=0.3), rngs=nnx.Rngs(4)),
}


def _outputs_and_grads(graphdef, rest, params, batches, objective, coefs, **lf_kw):
    """Per-example policy outputs of every batch layout and the gradient of the linear functional
    ``sum(coefs[name] * outputs)`` of each, in one compiled function."""
    logits_fn = make_logits_fn(graphdef, rest, **lf_kw)
    keys = ("policy_logps",) if "lists" in objective.requires else ("policy_chosen_logps", "policy_rejected_logps")
    keys += ("policy_kl_logps",) if "kl_completions" in objective.requires else ()

    def functional(p, b, coef):
        inputs = policy_inputs(logits_fn, p, b, objective)
        return sum(jnp.sum(coef * (n + 1) * inputs[k]) for n, k in enumerate(keys)), {k: inputs[k] for k in keys}

    @jax.jit
    def run(p, bs, cs):
        return {name: jax.value_and_grad(functional, has_aux=True)(p, bs[name], cs[name]) for name in bs}

    return run(params, {name: {k: jnp.asarray(v) for k, v in b.items()} for name, b in batches.items()},
               {name: jnp.asarray(c, jnp.float32) for name, c in coefs.items()})


def _concat_packed(*batches):
    """Packed batches side by side in one (rows and examples concatenated; targets re-pointed), so
    one forward checks several layouts. A batch without branch ids gets zeros (no shared prompt)."""
    out, offset = {}, 0
    rows = ("packed_input_ids", "packed_segment_ids", "packed_positions", "packed_branch_ids")
    parts = []
    for b in batches:
        b = dict(b)
        b.setdefault("packed_branch_ids", np.zeros_like(b["packed_input_ids"]))
        b.update({k: v + offset for k, v in b.items() if k.endswith("_target_index")})
        offset += b["packed_input_ids"].size
        parts.append(b)
    for k in parts[0]:
        out[k] = np.concatenate([b[k] for b in parts], axis=0)
    assert set(out) >= set(rows)
    return out


def _check(graphdef, rest, params, batch, objective, *, n=2, extra=(), **lf_kw):
    """Packed and shared-prompt layouts of ``batch`` (in one packed batch, with any ``extra``
    packed batches of the same examples after them, which enter the functional with weight 0)
    against the padded batch: per-example outputs and gradients, ≤ 1e-5 relative."""
    L = packed_row_len(P, C, n_responses=n, share_prompt=True)  # one row length for both (one batch)
    packed = pack_batch(batch, row_len=L, target_len=C)
    shared = pack_batch(batch, row_len=L, target_len=C, share_prompt=True)
    B = len(next(v for k, v in batch.items() if k.endswith("_input_ids")))
    assert packed["packed_input_ids"].shape[0] < n * B  # several sequences share rows
    both = _concat_packed(packed, shared, *extra)
    key = "cand_scores" if "cand_scores" in batch else "weight"
    c = np.linspace(0.5, 1.5, batch[key].size).reshape(batch[key].shape)
    c2 = np.linspace(-1.0, 0.7, batch[key].size).reshape(batch[key].shape)
    cs = {"padded": c + c2, "both": np.concatenate([c, c2] + [np.zeros_like(c)] * len(extra))}
    out = _outputs_and_grads(graphdef, rest, params, {"padded": batch, "both": both}, objective, cs, **lf_kw)
    (_, want), want_g = out["padded"]
    (_, got), got_g = out["both"]
    for k in want:
        for part, name in enumerate(("packed", "shared")):
            np.testing.assert_allclose(np.asarray(got[k][part * B:(part + 1) * B]), np.asarray(want[k]), rtol=1e-5,
                                       atol=1e-5, err_msg=f"{name}: {k}")
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(want_g))
    assert scale > 1e-3
    for a, b in zip(jax.tree_util.tree_leaves(got_g), jax.tree_util.tree_leaves(want_g)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * scale, err_msg="gradient")
    return {k: (np.asarray(want[k]), np.asarray(got[k][2 * B:])) for k in want}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_and_shared_equal_padded(family):
    """Log-probs and parameter gradients of packed and shared-prompt batches equal the padded
    two-sequence computation (≤ 1e-5 relative, fp32)."""
    graphdef, params, rest = split_model(FAMILIES[family]())
    batch = make_batch(4, seed=5)
    if family != "llama":
        _check(graphdef, rest, params, batch, make_objective("dpo"))
        return
    # not a tautology: letting a rejected token see the chosen response (branch ids dropped), or
    # not continuing its positions from the prompt's end, changes its log-prob
    shared = pack_batch(batch, row_len=P + 2 * C, target_len=C, share_prompt=True)
    leaky = {**shared, "packed_branch_ids": np.zeros_like(shared["packed_branch_ids"])}
    moved = {**shared, "packed_positions": np.where(shared["packed_branch_ids"] == 2, shared["packed_positions"] + C,
                                                    shared["packed_positions"])}
    extra = _check(graphdef, rest, params, batch, make_objective("dpo"), extra=(leaky, moved))
    want, got = extra["policy_rejected_logps"]
    assert np.abs(got[:4] - want).max() > 1e-2 and np.abs(got[4:] - want).max() > 1e-2
    want, got = extra["policy_chosen_logps"]  # the chosen response sees the same tokens either way
    np.testing.assert_allclose(got, np.concatenate([want, want]), rtol=1e-5, atol=1e-5)


def test_kto_kl_group_listwise_lora_and_response_window():
    """KTO's kl group and listwise K-candidate batches pack (packed and shared prompt); LoRA
    adapters' gradients and the response window / chunked LM head match the padded path."""
    from alignshift.models.lora import LoRAConfig, apply_lora, split_lora

    model = FAMILIES["mistral_sliding"]()
    graphdef, params, rest = split_model(model)
    _check(graphdef, rest, params, make_batch(4, seed=7, groups=("chosen", "rejected", "kl")), make_objective("kto"),
           n=3)
    _check(graphdef, rest, params, make_batch(4, seed=8, K=3), make_objective("pl"), n=3)

    apply_lora(model, LoRAConfig(rank=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj")), rngs=nnx.Rngs(9))
    graphdef, lora, rest = split_lora(model)
    lora = jax.tree_util.tree_map(lambda x: x + 0.1, lora)  # non-zero B: the adapters act
    _check(graphdef, rest, lora, make_batch(4, seed=10), make_objective("dpo"), response_window=C, logits_chunk=3)


# ------------------------------------------------------------------ training path


def test_dpo_training_packed_equals_padded():
    """run_preference with train.packing + train.share_prompt (and 2 accumulated micro-batches,
    in-step reference) gives the padded run's losses and final parameters (≤ 1e-5)."""
    cfg = load_config(None, [
        "model.hidden_size=32", "model.intermediate_size=48", "model.num_attention_heads=4",
        "model.num_key_value_heads=2", "model.num_hidden_layers=2", "train.batch_size=8", "train.steps=2",
        "train.log_every=1", "train.eval_every=0", "train.precompute_reference=false",
        "train.optim.warmup_steps=0", "train.optim.lr=0.5", "train.optim.eps=1.0", "train.optim.grad_clip=0",
        "data.scenario_kwargs={n_train: 16, n_test: 4, n_sft: 4}"])
    data = make_scenario("deploy_shift", seed=0, **cfg.data.scenario_kwargs)
    model = phases.build_policy(cfg.model, data.tokenizer, seed=0)
    graphdef, params, rest = split_model(model)
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=cfg.data.max_prompt_len,
                          max_completion_len=cfg.data.max_completion_len)
    runs = {}
    for name, over in (("padded", {}), ("packed", dict(packing=True, share_prompt=True, grad_accum_steps=2))):
        c = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **over))
        runs[name] = phases.run_preference(graphdef, rest, params, arrays, MethodConfig(), c, seed=0)
    (p0, h0), (p1, h1) = runs["padded"], runs["packed"]
    l0, l1 = [r["loss"] for r in h0], [r["loss"] for r in h1]
    assert len(l0) == 2 and l0[-1] != l0[0]  # it trains
    np.testing.assert_allclose(l1, l0, rtol=1e-5)
    # the updates (eps = 1: Adam's step is about linear in the gradient, so it does not blow up
    # float rounding in near-zero gradient entries as sign(g) would)
    leaves = [(np.asarray(a) - np.asarray(c), np.asarray(b) - np.asarray(c)) for a, b, c in
              zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves(params))]
    scale = max(np.abs(d0).max() for _, d0 in leaves)
    assert scale > 1e-4
    for d1, d0 in leaves:
        np.testing.assert_allclose(d1, d0, rtol=1e-5, atol=1e-5 * scale)
    pk = phases.pack_kwargs(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, packing=True)),
                            {k: v for k, v in arrays.items() if not k.startswith(("kl_", "prompt_"))})
    assert pk["row_len"] == arrays["chosen_input_ids"].shape[1] and pk["target_len"] == cfg.data.max_completion_len
