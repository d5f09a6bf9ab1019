"""Listwise losses (Plackett–Luce DPO, RRHF, LIRE) against float64 NumPy references, the K > 2
batch layout (encode_lists) and the listwise train-step path."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignshift.losses import dpo_loss, make_objective
from alignshift.losses.listwise import (
    lire_loss,
    plackett_luce_loss,
    plackett_luce_terms,
    reverse_logcumsumexp,
    rrhf_loss,
)

# ---------------------------------------------------------------- float64 NumPy references


def np_rank(scores, *arrays):
    order = np.argsort(-np.asarray(scores, np.float64), axis=-1, kind="stable")
    return [np.take_along_axis(np.asarray(a, np.float64), order, -1) for a in arrays]


def np_pl(pol, ref, scores, beta, reduction):
    p, r = np_rank(scores, pol, ref) if scores is not None else (np.float64(pol), np.float64(ref))
    s = beta * (p - r)
    B, K = s.shape
    out = np.zeros(B)
    for b in range(B):
        for k in range(K):
            out[b] -= s[b, k] - np.log(np.sum(np.exp(s[b, k:])))
    return out / K if reduction == "mean" else out


def np_rrhf(pol, n, scores, sft_weight=1.0, sft_candidate="best", sft_length=None):
    pol, n, scores = (np.asarray(x, np.float64) for x in (pol, n, scores))
    B, K = pol.shape
    q = pol / n
    out = np.zeros(B)
    for b in range(B):
        rank = 0.0
        for i in range(K):
            for j in range(K):
                if scores[b, j] > scores[b, i]:
                    rank += max(0.0, q[b, i] - q[b, j])
        c = int(np.argmax(scores[b])) if sft_candidate == "best" else sft_candidate % K
        denom = n[b, c] if sft_length is None else sft_length
        out[b] = rank / K + sft_weight * (-pol[b, c] / denom)
    return out


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def np_lire(pol, scores, T):
    return -(np_softmax(np.asarray(pol) / T) * np_softmax(scores)).sum(-1) / pol.shape[-1]


@pytest.fixture
def lists():
    rng = np.random.default_rng(0)
    B, K = 5, 4
    pol = rng.normal(-12, 3, size=(B, K)).astype(np.float32)
    ref = (pol + rng.normal(0, 2, size=(B, K))).astype(np.float32)
    n = rng.integers(2, 9, size=(B, K)).astype(np.float32)
    scores = rng.normal(size=(B, K)).astype(np.float32)
    scores[0, 1] = scores[0, 2]  # a tie: broken by column order / no ranking term
    return pol, ref, n, scores


# ---------------------------------------------------------------- Plackett–Luce


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_pl_matches_numpy(lists, reduction, beta):
    pol, ref, _, scores = lists
    got, metrics = plackett_luce_loss(pol, ref, scores, beta=beta, reduction=reduction)
    np.testing.assert_allclose(np.asarray(got), np_pl(pol, ref, scores, beta, reduction), rtol=2e-5, atol=1e-6)
    # rewards/chosen is the best-scored candidate's implicit reward
    p, r = np_rank(scores, pol, ref)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), np.mean(beta * (p[:, 0] - r[:, 0])), rtol=1e-5)


def test_pl_scores_none_means_already_ranked(lists):
    pol, ref, _, scores = lists
    p, r = np_rank(scores, pol, ref)
    a, _ = plackett_luce_loss(pol, ref, scores)
    b, _ = plackett_luce_loss(jnp.asarray(p, jnp.float32), jnp.asarray(r, jnp.float32), None)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_pl_k2_is_half_dpo_under_code_convention_and_dpo_under_paper_convention():
    rng = np.random.default_rng(1)
    pc, pr, rc, rr = (jnp.asarray(rng.normal(-10, 2, 6), jnp.float32) for _ in range(4))
    dpo, _ = dpo_loss(pc, pr, rc, rr, beta=0.3)
    pol, ref = jnp.stack([pc, pr], 1), jnp.stack([rc, rr], 1)
    mean, _ = plackett_luce_loss(pol, ref, None, beta=0.3)  # default reduction="mean" (authors' code)
    total, _ = plackett_luce_loss(pol, ref, None, beta=0.3, reduction="sum")  # DPO paper's PL
    np.testing.assert_allclose(np.asarray(mean), 0.5 * np.asarray(dpo), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(total), np.asarray(dpo), rtol=1e-6)
    # scores that put the rejected column first flip the ranking
    swapped, _ = plackett_luce_loss(jnp.stack([pr, pc], 1), jnp.stack([rr, rc], 1),
                                    jnp.asarray([[0.0, 1.0]] * 6), beta=0.3)
    np.testing.assert_allclose(np.asarray(swapped), 0.5 * np.asarray(dpo), rtol=1e-6)
    # and through make_objective: "pl" on pairwise inputs is half of "dpo"
    inputs = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
                  reference_rejected_logps=rr, chosen_n_tokens=jnp.ones(6), rejected_n_tokens=jnp.ones(6))
    lo_pl, _ = make_objective("pl", base_kwargs={"beta": 0.3})(inputs)
    lo_dpo, _ = make_objective("dpo", base_kwargs={"beta": 0.3})(inputs)
    assert float(lo_pl) == pytest.approx(0.5 * float(lo_dpo), rel=1e-6)


def test_reverse_logcumsumexp_is_stable():
    x = np.array([[1e4, 1e4 - 1, -1e4, 3.0], [-1e4, -1e4, -1e4, -1e4]], np.float32)
    got = np.asarray(reverse_logcumsumexp(jnp.asarray(x)))
    ref = np.stack([np.logaddexp.accumulate(row[::-1].astype(np.float64))[::-1] for row in x])
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    g = jax.grad(lambda s: reverse_logcumsumexp(s).sum())(jnp.asarray(x))
    assert np.all(np.isfinite(np.asarray(g)))
    # PL on huge implicit rewards stays finite (the authors' exp + cumsum overflows here)
    pol = jnp.asarray([[5e3, 0.0, -5e3]], jnp.float32)
    loss = plackett_luce_terms(pol, jnp.zeros_like(pol), None, beta=1.0).losses
    assert np.isfinite(float(loss[0]))


def test_pl_gradient_matches_numpy_finite_differences(lists):
    pol, ref, _, scores = lists
    with jax.enable_x64(True):
        f = lambda p: plackett_luce_loss(p, jnp.asarray(ref, jnp.float64), jnp.asarray(scores, jnp.float64),  # noqa: E731
                                         beta=0.5)[0].sum()
        g = np.asarray(jax.grad(f)(jnp.asarray(pol, jnp.float64)))
    p0 = pol.astype(np.float64)
    fd = np.zeros_like(p0)
    h = 1e-6
    for idx in np.ndindex(p0.shape):
        e = np.zeros_like(p0)
        e[idx] = h
        fd[idx] = (np_pl(p0 + e, ref, scores, 0.5, "mean").sum() - np_pl(p0 - e, ref, scores, 0.5, "mean").sum()) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-8)


# ---------------------------------------------------------------- RRHF and LIRE


@pytest.mark.parametrize("kw", [{}, {"sft_weight": 0.0}, {"sft_candidate": 2, "sft_length": 18},
                                {"sft_candidate": -1, "sft_weight": 0.5}])
def test_rrhf_matches_numpy(lists, kw):
    pol, _, n, scores = lists
    got, _ = rrhf_loss(pol, n, scores, **kw)
    np.testing.assert_allclose(np.asarray(got), np_rrhf(pol, n, scores, **kw), rtol=2e-5, atol=1e-6)


def test_rrhf_ties_give_no_ranking_term():
    pol = jnp.asarray([[-1.0, -9.0]])
    got, _ = rrhf_loss(pol, jnp.ones((1, 2)), jnp.asarray([[0.5, 0.5]]), sft_weight=0.0)
    assert float(got[0]) == 0.0
    got, _ = rrhf_loss(pol, jnp.ones((1, 2)), jnp.asarray([[0.0, 0.5]]), sft_weight=0.0)
    assert float(got[0]) == pytest.approx(8.0 / 2)


@pytest.mark.parametrize("T", [2.0, 0.7])
def test_lire_matches_numpy(lists, T):
    pol, _, _, scores = lists
    got, _ = lire_loss(pol, scores, temperature=T)
    np.testing.assert_allclose(np.asarray(got), np_lire(pol, scores, T), rtol=2e-5, atol=1e-7)


def test_listwise_bad_input_raises_clear_errors(lists):
    pol, ref, n, scores = lists
    with pytest.raises(ValueError, match=r"policy_logps must be \[B, K\]"):
        plackett_luce_loss(pol[0], ref[0])
    with pytest.raises(ValueError, match="K = 1"):
        plackett_luce_loss(pol[:, :1], ref[:, :1])
    with pytest.raises(ValueError, match="reference_logps has shape"):
        plackett_luce_loss(pol, ref[:, :3])
    with pytest.raises(ValueError, match="unknown reduction"):
        plackett_luce_loss(pol, ref, reduction="avg")
    with pytest.raises(ValueError, match="sft_candidate"):
        rrhf_loss(pol, n, scores, sft_candidate=7)
    with pytest.raises(ValueError, match="temperature"):
        lire_loss(pol, scores, temperature=0.0)
    with pytest.raises(ValueError, match="needs the candidates' judge scores"):
        make_objective("lire")({"policy_logps": jnp.asarray(pol), "n_tokens": jnp.asarray(n)})


def test_listwise_objectives_on_list_inputs(lists):
    pol, ref, n, scores = lists
    inputs = {"policy_logps": jnp.asarray(pol), "reference_logps": jnp.asarray(ref), "n_tokens": jnp.asarray(n),
              "scores": jnp.asarray(scores)}
    for base, ref_fn in (("pl", lambda: np_pl(pol, ref, scores, 0.1, "mean")),
                         ("rrhf", lambda: np_rrhf(pol, n, scores)),
                         ("lire", lambda: np_lire(pol, scores, 2.0))):
        obj = make_objective(base)
        assert "lists" in obj.requires
        loss, metrics = obj(inputs)
        assert float(loss) == pytest.approx(ref_fn().mean(), rel=2e-5)
        p, = np_rank(scores, pol)
        assert float(metrics["logps/chosen"]) == pytest.approx(p[:, 0].mean(), rel=1e-6)
    assert "lists" not in make_objective("dpo").requires


# ---------------------------------------------------------------- K > 2 layout and train step


@pytest.fixture(scope="module")
def tiny():
    from alignshift.data import make_scenario
    from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
    from alignshift.forward import make_logits_fn, split_model
    from flax import nnx

    data = make_scenario("deploy_shift", seed=0, n_train=8, n_test=4, n_sft=4)
    tok = data.tokenizer
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=tok.pad_id,
                      bos_token_id=tok.bos_id, eos_token_id=tok.eos_id)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    prompts = [e.prompt for e in data.train[:4]]
    cands = [[e.chosen, e.rejected, data.train[(i + 1) % 8].chosen] for i, e in enumerate(data.train[:4])]
    scores = [[2.0, 0.0, 1.0]] * 4
    return tok, graphdef, params, rest, make_logits_fn(graphdef, rest), prompts, cands, scores


def test_encode_lists_layout_and_errors(tiny):
    from alignshift.data import DataError, encode_completions
    from alignshift.data.encode import LIST_KEYS, encode_lists

    tok, *_, prompts, cands, scores = tiny
    enc = encode_lists(tok, prompts, cands, scores, max_prompt_len=8, max_completion_len=10)
    assert tuple(enc) == LIST_KEYS
    assert enc["cand_input_ids"].shape == (4, 3, 18) and enc["cand_scores"].shape == (4, 3)
    for k in range(3):
        one = encode_completions(tok, prompts, [c[k] for c in cands], max_prompt_len=8, max_completion_len=10)
        for f in ("input_ids", "attention_mask", "loss_mask"):
            np.testing.assert_array_equal(enc[f"cand_{f}"][:, k], one[f])
    with pytest.raises(DataError, match="row 1: field 'candidates'"):
        encode_lists(tok, prompts, [cands[0], cands[1][:2], *cands[2:]], max_prompt_len=8, max_completion_len=10)
    with pytest.raises(DataError, match=r"row 2: field 'candidates\[1\]'"):
        bad = [list(c) for c in cands]
        bad[2][1] = " "
        encode_lists(tok, prompts, bad, max_prompt_len=8, max_completion_len=10)
    with pytest.raises(DataError, match="row 0: field 'scores'"):
        encode_lists(tok, prompts, cands, [[1.0, float("nan"), 0.0]] * 4, max_prompt_len=8, max_completion_len=10)


def test_listwise_step_inputs_equal_per_candidate_logps_and_step_runs(tiny):
    import optax

    from alignshift.data.encode import encode_lists
    from alignshift.forward import attach_reference, batch_sequence_logps, policy_inputs
    from alignshift.train.steps import init_state, make_preference_step

    tok, graphdef, params, rest, logits_fn, prompts, cands, scores = tiny
    enc = encode_lists(tok, prompts, cands, scores, max_prompt_len=8, max_completion_len=10)
    batch = {k: v for k, v in enc.items() if k.startswith("cand_")}
    batch["source_prob"] = np.full((4, 3), 0.5, np.float32)
    batch["source_share"] = np.full((4, 3), 0.5, np.float32)
    ref_params = jax.tree_util.tree_map(lambda x: x * 0.9, params)
    obj = make_objective("pl", "dora", weighting_kwargs={"alpha": 0.5, "lam": 1.0})
    full = attach_reference(logits_fn, batch, obj, ref_params)
    inputs = jax.jit(lambda p, b: policy_inputs(logits_fn, p, b, obj))(params, full)
    seq = jax.jit(lambda p, i, a, m: batch_sequence_logps(logits_fn, p, i, a, m))
    flat = [batch[f"cand_{f}"].transpose(1, 0, 2).reshape(12, -1) for f in ("input_ids", "attention_mask", "loss_mask")]
    s, n = (np.asarray(x).reshape(3, 4).T for x in seq(params, *flat))  # candidate by candidate
    sr = np.asarray(seq(ref_params, *flat)[0]).reshape(3, 4).T
    np.testing.assert_allclose(np.asarray(inputs["policy_logps"]), s, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(inputs["n_tokens"]), n)
    np.testing.assert_allclose(np.asarray(inputs["reference_logps"]), sr, rtol=1e-5)
    assert inputs["source_prob"].shape == (4, 3)
    # h̃ = p/(αp + a(1−p)) = 1 here, so DoRA = λ·log mean exp(ℓ_PL/λ) of the per-prompt PL losses
    terms = plackett_luce_terms(inputs["policy_logps"], inputs["reference_logps"], inputs["scores"])
    loss, _ = obj(inputs)
    L = np.asarray(terms.losses, np.float64)
    assert float(loss) == pytest.approx(np.log(np.mean(np.exp(L))), rel=1e-5)

    tx = optax.sgd(1e-2)
    step = make_preference_step(graphdef, rest, tx, obj)
    state = init_state(jax.tree_util.tree_map(jnp.copy, params), tx)
    state, m_in = step(state, batch, ref_params)  # reference forward inside the step
    assert float(m_in["loss"]) == pytest.approx(float(loss), rel=1e-5)
    assert math.isfinite(float(m_in["grad_norm"])) and float(m_in["grad_norm"]) > 0


def test_preference_module_does_not_import_listwise():
    """listwise.py imports preference.py (PreferenceTerms, pair_metrics); not the other way round."""
    import inspect

    import alignshift.losses.preference as preference

    assert "listwise" not in inspect.getsource(preference).split('"""', 2)[2]
    assert not hasattr(preference, "plackett_luce_loss")
