"""WDPO's gradient-norm penalty through the model's input embeddings (double backprop)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from alignshift.losses import make_objective
from alignshift.losses.penalties import PenaltyGradient
from alignshift.models import LlamaConfig, LlamaForCausalLM
from alignshift.forward import split_model
from alignshift.train.steps import init_state, make_preference_step
from alignshift.train.wdpo import wdpo_inputs_and_penalty

V, T, B = 23, 7, 4


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    g, params, rest = split_model(model)
    params = jax.tree_util.tree_map(lambda x: x * 3.0, params)  # make the loss landscape non-flat
    rng = np.random.default_rng(0)
    batch = {}
    for k in ("chosen", "rejected"):
        ids = rng.integers(1, V, (B, T)).astype(np.int32)
        lengths = rng.integers(4, T + 1, B)
        am = (np.arange(T)[None] < lengths[:, None]).astype(np.int32)
        lm = am.copy()
        lm[:, :2] = 0  # 2 prompt tokens
        batch[f"{k}_input_ids"], batch[f"{k}_attention_mask"], batch[f"{k}_loss_mask"] = ids * am, am, lm
        batch[f"reference_{k}_logps"] = rng.normal(-15, 1, B).astype(np.float32)
    return g, params, rest, {k: jnp.asarray(v) for k, v in batch.items()}


def test_rho_zero_equals_base_loss_and_grads(tiny):
    g, params, rest, batch = tiny
    tx = optax.sgd(0.1)
    plain = make_preference_step(g, rest, tx, make_objective("dpo"))
    wdpo = make_preference_step(g, rest, tx, make_objective("dpo", penalty="wdpo", penalty_kwargs={"rho": 0.0}))
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
    s1, m1 = plain(init_state(copy(params), tx), batch)
    s2, m2 = wdpo(init_state(copy(params), tx), batch)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(s1["params"]), jax.tree_util.tree_leaves(s2["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert float(m2["penalty"]) == 0.0


def test_embedding_gradient_matches_finite_differences(tiny):
    """<g, u> equals the directional derivative of Σ_i L_i along u (so P_i = ‖g_i‖² is right)."""
    g, params, rest, batch = tiny
    obj = make_objective("dpo", penalty="wdpo", penalty_kwargs={"rho": 1.0})
    model = nnx.merge(g, params, rest)
    ids = jnp.concatenate([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    am = jnp.concatenate([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    lm = jnp.concatenate([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    e0 = model.embed(ids)

    def total(e):
        from alignshift.losses import sequence_logps

        logits = model(inputs_embeds=e, attention_mask=am)
        s, n = sequence_logps(logits[:, :-1], ids[:, 1:], lm[:, 1:])
        inp = dict(policy_chosen_logps=s[:B], policy_rejected_logps=s[B:], chosen_n_tokens=n[:B],
                   rejected_n_tokens=n[B:], reference_chosen_logps=batch["reference_chosen_logps"],
                   reference_rejected_logps=batch["reference_rejected_logps"])
        return obj.terms(inp)[0].losses.sum()

    total = jax.jit(total)
    grad_e = jax.jit(jax.grad(total))(e0)
    _, pen, p = wdpo_inputs_and_penalty(g, rest, params, batch, obj)
    sq = np.asarray(jnp.sum(grad_e ** 2, axis=(1, 2)))
    np.testing.assert_allclose(np.asarray(p), sq[:B] + sq[B:], rtol=1e-5)
    np.testing.assert_allclose(float(pen), float(np.mean(sq[:B] + sq[B:])), rtol=1e-5)
    u = jax.random.normal(jax.random.PRNGKey(1), e0.shape) * (am[..., None] > 0)
    h = 1e-3
    fd = (total(e0 + h * u) - total(e0 - h * u)) / (2 * h)
    np.testing.assert_allclose(float(jnp.vdot(grad_e, u)), float(fd), rtol=2e-2)


@pytest.mark.parametrize("kind", ["squared_mean", "sqrt_mean"])
def test_penalty_parameter_gradient(tiny, kind):
    """Double backprop: ∇_θ penalty (reverse-over-reverse, through g) equals the forward-mode
    directional derivative (jvp-of-vjp, an independent path) and a finite difference."""
    g, params, rest, batch = tiny
    obj = make_objective("dpo", penalty="wdpo", penalty_kwargs={"rho": 1.0, "penalty": kind})
    pen = jax.jit(lambda p: wdpo_inputs_and_penalty(g, rest, p, batch, obj)[1])
    leaves = jax.tree_util.tree_leaves
    d = jax.tree_util.tree_map(lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape), params)
    an = sum(jnp.vdot(a, b) for a, b in zip(leaves(jax.jit(jax.grad(pen))(params)), leaves(d)))
    _, fwd = jax.jit(lambda p, t: jax.jvp(pen, (p,), (t,)))(params, d)
    assert float(pen(params)) > 0
    np.testing.assert_allclose(float(an), float(fwd), rtol=1e-4)


def test_penalty_parameter_gradient_matches_finite_differences_float64(tiny):
    """In float64 (the landscape is curved: float32 FD cannot resolve it)."""
    _, _, _, batch32 = tiny
    with jax.enable_x64(True):
        cfg = LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
        g, params, rest = split_model(LlamaForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.float64,
                                                       param_dtype=jnp.float64))
        batch = {k: (v.astype(jnp.float64) if v.dtype == jnp.float32 else v) for k, v in batch32.items()}
        obj = make_objective("dpo", penalty="wdpo", penalty_kwargs={"rho": 1.0})
        pen = jax.jit(lambda p: wdpo_inputs_and_penalty(g, rest, p, batch, obj)[1])  # jit: eager f64 is slow
        leaves = jax.tree_util.tree_leaves
        d = jax.tree_util.tree_map(
            lambda x: jax.random.normal(jax.random.PRNGKey(x.size), x.shape, dtype=jnp.float64), params)
        an = sum(jnp.vdot(a, b) for a, b in zip(leaves(jax.jit(jax.grad(pen))(params)), leaves(d)))
        h = 3e-4
        fd = (pen(jax.tree_util.tree_map(lambda x, y: x + h * y, params, d))
              - pen(jax.tree_util.tree_map(lambda x, y: x - h * y, params, d))) / (2 * h)
        np.testing.assert_allclose(float(an), float(fd), rtol=1e-2)


def test_pair_penalties_independent_of_other_pairs(tiny):
    g, params, rest, batch = tiny
    obj = make_objective("dpo", penalty="wdpo", penalty_kwargs={"rho": 1.0})
    _, _, p = wdpo_inputs_and_penalty(g, rest, params, batch, obj)
    other = dict(batch)
    rng = np.random.default_rng(5)
    for k in ("chosen", "rejected"):  # change pairs 1..B-1 (tokens and padding), keep pair 0
        ids = np.asarray(batch[f"{k}_input_ids"]).copy()
        am = np.asarray(batch[f"{k}_attention_mask"]).copy()
        ids[1:] = rng.integers(1, V, (B - 1, T))
        am[1:, 3:] = 0
        ids = ids * am
        lm = am.copy()
        lm[:, :2] = 0
        lm[0] = np.asarray(batch[f"{k}_loss_mask"])[0]
        other[f"{k}_input_ids"], other[f"{k}_attention_mask"], other[f"{k}_loss_mask"] = map(jnp.asarray, (ids, am, lm))
    _, _, p2 = wdpo_inputs_and_penalty(g, rest, params, other, obj)
    np.testing.assert_allclose(float(p2[0]), float(p[0]), rtol=1e-5)
    assert not np.allclose(np.asarray(p2[1:]), np.asarray(p[1:]))


def test_bad_penalty_config():
    with pytest.raises(ValueError, match="unknown penalty"):
        make_objective("dpo", penalty="w")
    with pytest.raises(ValueError, match="penalty= must be one of"):
        make_objective("dpo", penalty="wdpo", penalty_kwargs={"penalty": "sqrt"})
    with pytest.raises(ValueError, match="without a penalty"):
        make_objective("dpo", penalty_kwargs={"rho": 1.0})


@pytest.mark.parametrize("mode,tol", [("forward_over_reverse", 1e-4), ("finite_difference", 2e-2)])
@pytest.mark.parametrize("kind", ["squared_mean", "sqrt_mean"])
def test_first_order_gradient_matches_exact(tiny, kind, mode, tol):
    """PenaltyGradient mode 'forward_over_reverse' (jvp of the gradient) = double back-propagation
    to rounding; 'finite_difference' (two first-order passes, default fd_eps) to O(fd_eps)."""
    g, params, rest, batch = tiny
    tx = optax.sgd(1.0)
    copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)  # noqa: E731
    kw = {"rho": 0.5, "penalty": kind}
    exact = make_preference_step(g, rest, tx, make_objective("dpo", penalty="wdpo", penalty_kwargs=kw))
    fd = make_preference_step(g, rest, tx, make_objective("dpo", penalty="wdpo", penalty_kwargs=kw),
                              penalty_gradient=PenaltyGradient(mode))
    plain = make_preference_step(g, rest, tx, make_objective("dpo"))
    upd = {}
    for name, step in (("exact", exact), ("fd", fd), ("plain", plain)):
        s, m = step(init_state(copy(params), tx), batch)
        upd[name] = np.concatenate([np.ravel(np.asarray(a) - np.asarray(b)) for a, b in
                                    zip(jax.tree_util.tree_leaves(s["params"]), jax.tree_util.tree_leaves(params))])
        if name != "plain":
            upd[name + "_m"] = {k: float(v) for k, v in m.items()}
    np.testing.assert_allclose(upd["fd_m"]["loss"], upd["exact_m"]["loss"], rtol=1e-5)
    np.testing.assert_allclose(upd["fd_m"]["penalty"], upd["exact_m"]["penalty"], rtol=1e-5)
    pen_exact, pen_fd = upd["exact"] - upd["plain"], upd["fd"] - upd["plain"]
    assert np.linalg.norm(pen_exact) > 0.05 * np.linalg.norm(upd["plain"])  # the penalty matters here
    assert np.linalg.norm(pen_fd - pen_exact) < tol * np.linalg.norm(pen_exact)


def test_first_order_modes_need_plain_mean(tiny):
    g, params, rest, batch = tiny
    tx = optax.sgd(0.1)
    obj = make_objective("dpo", weighting="kl_dro", penalty="wdpo")
    with pytest.raises(ValueError, match="finite_difference.*uniform"):
        make_preference_step(g, rest, tx, obj, penalty_gradient=PenaltyGradient("finite_difference"))(
            init_state(params, tx), batch)
    with pytest.raises(ValueError, match="gradient mode"):
        PenaltyGradient("fd")
    # a first-order mode needs a penalty that has one
    with pytest.raises(ValueError, match="needs a penalty with a first-order gradient"):
        make_preference_step(g, rest, tx, make_objective("dpo"), penalty_gradient=PenaltyGradient("finite_difference"))
    # the old spelling (a hyper-parameter of the penalty) points at the training setting
    with pytest.raises(ValueError, match="training setting.*penalty_gradient"):
        make_objective("dpo", penalty="wdpo", penalty_kwargs={"gradient": "finite_difference"})


@pytest.mark.parametrize("mode", ["finite_difference", "forward_over_reverse"])
def test_subsampled_penalty_gradient_is_unbiased(tiny, mode):
    """PenaltyGradient pairs=m: the penalty's parameter gradient from m of the n pairs per step,
    scaled by n/m. Loss and penalty values stay exact; over many steps (different draws) the
    mean gradient equals the exact all-pairs gradient within its standard error, while single
    draws differ from it (the test can see a biased or unscaled estimate)."""
    from alignshift.train.wdpo import wdpo_first_order_grads

    g, params, rest, batch = tiny
    kw = {"rho": 0.5, "penalty": "squared_mean"}
    flat = lambda t: np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(t)])  # noqa: E731

    obj = make_objective("dpo", penalty="wdpo", penalty_kwargs=kw)

    def grads_fn(gradient):
        return jax.jit(lambda p, b, s: wdpo_first_order_grads(g, rest, p, b, obj, s, gradient))

    full = grads_fn(PenaltyGradient(mode))
    sub = grads_fn(PenaltyGradient(mode, pairs=2))
    loss0, m0, g0 = full(params, batch, jnp.int32(0))
    exact = flat(g0)
    draws = []
    for s in range(48):
        loss, met, gs = sub(params, batch, jnp.int32(s))
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-6)
        np.testing.assert_allclose(float(met["penalty"]), float(m0["penalty"]), rtol=1e-6)
        draws.append(flat(gs))
    draws = np.stack(draws)
    spread = np.linalg.norm(draws - exact, axis=1)
    assert np.median(spread) > 0.05 * np.linalg.norm(exact)  # single draws are noisy estimates
    se = draws.std(axis=0, ddof=1) / np.sqrt(len(draws))
    z = np.abs(draws.mean(axis=0) - exact) / np.maximum(se, 1e-12 * np.abs(exact).max())
    assert np.mean(z < 3.5) > 0.98, np.sort(z)[-10:]
    assert np.linalg.norm(draws.mean(axis=0) - exact) < 0.25 * np.median(spread)


def test_subsampled_penalty_argument_errors():
    with pytest.raises(ValueError, match="needs mode='finite_difference'"):
        PenaltyGradient(pairs=2)
    with pytest.raises(ValueError, match="pairs must be an int >= 0"):
        PenaltyGradient("finite_difference", pairs=-1)
    with pytest.raises(ValueError, match="fd_eps must be a finite number > 0"):
        PenaltyGradient("finite_difference", fd_eps=0.0)
    with pytest.raises(ValueError, match="unknown key"):
        PenaltyGradient.from_dict({"mode": "exact", "eps": 1e-3})
