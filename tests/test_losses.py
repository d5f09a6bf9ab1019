"""Losses against independent float64 NumPy references (values and gradients)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignshift.losses import (
    dpo_loss,
    kto_loss,
    make_objective,
    mean_logps,
    sequence_logps,
    simpo_loss,
)

# ---------------------------------------------------------------- NumPy references (float64)


def np_softplus(x):
    return np.logaddexp(0.0, x)


def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_sequence_logps(logits, labels, mask):
    logits = logits.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - m).sum(-1)) + m[..., 0]
    B, T, _ = logits.shape
    out = np.zeros(B)
    for b in range(B):
        for t in range(T):
            if mask[b, t]:
                out[b] += logits[b, t, labels[b, t]] - logz[b, t]
    return out, mask.sum(-1).astype(np.float64)


def np_dpo(pc, pr, rc, rr, beta, loss_type, eps):
    """TRL's published formulas (dpo_trainer.py), written with log-sigmoid."""
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -np_log_sigmoid(beta * logits) * (1 - eps) - np_log_sigmoid(-beta * logits) * eps
    if loss_type == "robust":
        return (-np_log_sigmoid(beta * logits) * (1 - eps) + np_log_sigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * logits)
    raise AssertionError(loss_type)


def np_simpo(c_avg, r_avg, beta, gamma):
    return -np_log_sigmoid(beta * c_avg - beta * r_avg - gamma)


def np_kto(pc, pr, rc, rr, pkl, rkl, beta, wd, wu):
    z0 = max(0.0, float(np.mean(pkl - rkl)))
    sig = lambda x: 1 / (1 + np.exp(-x))
    ld = 1 - sig(beta * ((pc - rc) - z0))
    lu = 1 - sig(beta * (z0 - (pr - rr)))
    return 0.5 * (wd * ld + wu * lu), z0


def fd_grad(f, x, h=1e-6):
    """Central finite differences of a scalar float64 function."""
    g = np.zeros_like(x)
    for i in range(x.size):
        e = np.zeros_like(x)
        e.flat[i] = h
        g.flat[i] = (f(x + e) - f(x - e)) / (2 * h)
    return g


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def _logps(rng, n=8, scale=3.0):
    return [rng.normal(-20.0, scale, size=n) for _ in range(4)]


# ---------------------------------------------------------------- sequence_logps


def test_sequence_logps_matches_numpy(rng):
    B, T, V = 3, 7, 11
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 3
    labels = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.int32)
    s, n = sequence_logps(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    chex.assert_shape((s, n), (B,))
    chex.assert_type((s, n), jnp.float32)
    ref_s, ref_n = np_sequence_logps(logits, labels, mask)
    np.testing.assert_allclose(np.asarray(s), ref_s, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(n), ref_n)
    np.testing.assert_allclose(np.asarray(mean_logps(s, n)), ref_s / np.maximum(ref_n, 1), rtol=1e-5)


def test_sequence_logps_bf16_logits_computed_in_fp32(rng):
    logits = rng.normal(size=(2, 5, 13)).astype(np.float32)
    labels = rng.integers(0, 13, size=(2, 5))
    mask = np.ones((2, 5), np.int32)
    s, _ = sequence_logps(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(labels), jnp.asarray(mask))
    assert s.dtype == jnp.float32
    ref, _ = np_sequence_logps(np.asarray(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)), labels, mask)
    np.testing.assert_allclose(np.asarray(s), ref, rtol=1e-5)


def test_sequence_logps_masking_invariance_values_and_grads(rng):
    """Garbage (NaN/inf/huge) logits and out-of-range labels at masked positions change nothing."""
    B, T, V = 2, 6, 9
    logits = rng.normal(size=(B, T, V)).astype(np.float32)
    labels = rng.integers(0, V, size=(B, T))
    mask = np.array([[0, 0, 1, 1, 1, 0], [0, 1, 1, 0, 0, 0]], np.int32)
    garbage = logits.copy()
    garbage[mask == 0] = np.nan
    garbage[0, 0, 0] = np.inf
    garbage[1, 5, :] = 1e30
    bad_labels = labels.copy()
    bad_labels[mask == 0] = -100

    def f(lg, lb):
        return sequence_logps(lg, lb, jnp.asarray(mask))[0].sum()

    v1, g1 = jax.value_and_grad(f)(jnp.asarray(logits), jnp.asarray(labels))
    v2, g2 = jax.value_and_grad(f)(jnp.asarray(garbage), jnp.asarray(bad_labels))
    assert np.isfinite(v2) and np.all(np.isfinite(np.asarray(g2)))
    np.testing.assert_array_equal(np.asarray(v1), np.asarray(v2))
    np.testing.assert_array_equal(np.asarray(g1)[mask == 1], np.asarray(g2)[mask == 1])
    assert np.all(np.asarray(g2)[mask == 0] == 0)


def test_sequence_logps_grad_matches_numpy(rng):
    B, T, V = 2, 3, 5
    logits = rng.normal(size=(B, T, V))
    labels = rng.integers(0, V, size=(B, T))
    mask = np.array([[1, 1, 0], [0, 1, 1]], np.int32)
    g = jax.grad(lambda x: sequence_logps(x, jnp.asarray(labels), jnp.asarray(mask))[0].sum())(
        jnp.asarray(logits, jnp.float32)
    )
    ref = fd_grad(lambda x: np_sequence_logps(x, labels, mask)[0].sum(), logits)
    np.testing.assert_allclose(np.asarray(g), ref, atol=1e-5)


@pytest.mark.parametrize(
    "shapes, msg",
    [
        (((2, 5, 7), (2, 4), (2, 4)), "labels shape"),
        (((2, 5, 7), (2, 5), (2, 4)), "mask shape"),
        (((2, 5), (2, 5), (2, 5)), "logits must be"),
    ],
)
def test_sequence_logps_shape_errors(shapes, msg):
    lg, lb, mk = shapes
    with pytest.raises(ValueError, match=msg):
        sequence_logps(jnp.zeros(lg), jnp.zeros(lb, jnp.int32), jnp.ones(mk))


# ---------------------------------------------------------------- DPO family

CASES = [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.1), ("robust", 0.3), ("ipo", 0.0), ("hinge", 0.0)]


@pytest.mark.parametrize("loss_type, eps", CASES)
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_values_match_numpy(rng, loss_type, eps, beta):
    pc, pr, rc, rr = _logps(rng)
    losses, metrics = jax.jit(
        lambda *a: dpo_loss(*a, beta=beta, loss_type=loss_type, label_smoothing=eps)
    )(*[jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr)])
    chex.assert_shape(losses, (8,))
    ref = np_dpo(pc, pr, rc, rr, beta, loss_type, eps)
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-5, atol=2e-5)
    # TRL metric names and values
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), np.mean(beta * (pc - rc)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/rejected"]), np.mean(beta * (pr - rr)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        float(metrics["rewards/margins"]), np.mean(beta * ((pc - rc) - (pr - rr))), rtol=1e-4, atol=1e-5
    )
    np.testing.assert_allclose(float(metrics["rewards/accuracies"]), np.mean((pc - rc) > (pr - rr)))
    np.testing.assert_allclose(float(metrics["logps/chosen"]), pc.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["logps/rejected"]), pr.mean(), rtol=1e-5)


@pytest.mark.parametrize("loss_type, eps", CASES)
def test_dpo_loss_grads_match_finite_differences(rng, loss_type, eps):
    beta = 0.2
    pc, pr, rc, rr = [rng.normal(0, 2.0, size=5) for _ in range(4)]
    if loss_type == "hinge":  # keep away from the kink
        pc = pc + np.where(beta * ((pc - rc) - (pr - rr)) > 0.9, 1.0, 0.0) * 0.5

    def jf(x, y):
        return dpo_loss(x, y, jnp.asarray(rc, jnp.float32), jnp.asarray(rr, jnp.float32), beta=beta,
                        loss_type=loss_type, label_smoothing=eps)[0].sum()

    gc, gr = jax.grad(jf, argnums=(0, 1))(jnp.asarray(pc, jnp.float32), jnp.asarray(pr, jnp.float32))
    ref_c = fd_grad(lambda x: np_dpo(x, pr, rc, rr, beta, loss_type, eps).sum(), pc)
    ref_r = fd_grad(lambda x: np_dpo(pc, x, rc, rr, beta, loss_type, eps).sum(), pr)
    np.testing.assert_allclose(np.asarray(gc), ref_c, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gr), ref_r, rtol=1e-4, atol=1e-5)


def test_dpo_no_gradient_through_reference(rng):
    pc, pr, rc, rr = [jnp.asarray(x, jnp.float32) for x in _logps(rng)]
    g = jax.grad(lambda a, b: dpo_loss(pc, pr, a, b)[0].sum(), argnums=(0, 1))(rc, rr)
    assert not np.any(np.asarray(g[0])) and not np.any(np.asarray(g[1]))


def test_dpo_is_ln2_when_policy_equals_reference(rng):
    pc, pr, _, _ = [jnp.asarray(x, jnp.float32) for x in _logps(rng)]
    losses, metrics = dpo_loss(pc, pr, pc, pr, beta=0.1)
    np.testing.assert_allclose(np.asarray(losses), math.log(2.0), rtol=1e-6)
    assert float(metrics["rewards/margins"]) == 0.0


def test_dpo_bad_arguments():
    x = jnp.zeros(4)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(x, x, x, x, loss_type="nope")
    with pytest.raises(ValueError, match="reference_rejected_logps has shape"):
        dpo_loss(x, x, x, jnp.zeros(3))
    with pytest.raises(ValueError, match="robust"):
        dpo_loss(x, x, x, x, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1)


# ---------------------------------------------------------------- SimPO and KTO


def test_simpo_matches_numpy_values_and_grads(rng):
    c, r = rng.normal(-2, 0.5, size=6), rng.normal(-2, 0.5, size=6)
    beta, ratio = 2.0, 0.55
    losses, metrics = simpo_loss(jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32), beta=beta,
                                 gamma_beta_ratio=ratio)
    np.testing.assert_allclose(np.asarray(losses), np_simpo(c, r, beta, ratio * beta), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]), np.mean(beta * c), rtol=1e-5)
    # explicit gamma overrides the ratio
    l2, _ = simpo_loss(jnp.asarray(c, jnp.float32), jnp.asarray(r, jnp.float32), beta=beta, gamma=1.6)
    np.testing.assert_allclose(np.asarray(l2), np_simpo(c, r, beta, 1.6), rtol=1e-5)
    g = jax.grad(lambda x: simpo_loss(x, jnp.asarray(r, jnp.float32), beta=beta, gamma=1.6)[0].sum())(
        jnp.asarray(c, jnp.float32))
    np.testing.assert_allclose(np.asarray(g), fd_grad(lambda x: np_simpo(x, r, beta, 1.6).sum(), c), rtol=1e-4)


@pytest.mark.parametrize("kl_shift", [-3.0, 2.0])  # z0 clamped at 0 / positive
def test_kto_matches_numpy(rng, kl_shift):
    pc, pr, rc, rr = _logps(rng, n=6)
    pkl = rng.normal(-20, 3, size=6)
    rkl = pkl - kl_shift + rng.normal(0, 0.1, size=6)
    args = [jnp.asarray(x, jnp.float32) for x in (pc, pr, rc, rr, pkl, rkl)]
    losses, metrics = kto_loss(*args, beta=0.1, desirable_weight=1.0, undesirable_weight=1.2)
    ref, z0 = np_kto(pc, pr, rc, rr, pkl, rkl, 0.1, 1.0, 1.2)
    np.testing.assert_allclose(np.asarray(losses), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["kl"]), z0, rtol=1e-4, atol=1e-6)
    # z0 is detached: no gradient flows into the mismatched completions
    g = jax.grad(lambda x: kto_loss(args[0], args[1], args[2], args[3], x, args[5])[0].sum())(args[4])
    assert not np.any(np.asarray(g))
    gc = jax.grad(lambda x: kto_loss(x, *args[1:], beta=0.1, undesirable_weight=1.2)[0].sum())(args[0])
    ref_g = fd_grad(lambda x: np_kto(x, pr, rc, rr, pkl, rkl, 0.1, 1.0, 1.2)[0].sum(), pc)
    np.testing.assert_allclose(np.asarray(gc), ref_g, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- make_objective


def _inputs(rng, n=8):
    pc, pr, rc, rr = _logps(rng, n)
    d = dict(policy_chosen_logps=pc, policy_rejected_logps=pr, reference_chosen_logps=rc,
             reference_rejected_logps=rr, chosen_n_tokens=rng.integers(1, 9, n).astype(float),
             rejected_n_tokens=rng.integers(1, 9, n).astype(float), policy_kl_logps=rng.normal(-20, 3, n),
             reference_kl_logps=rng.normal(-20, 3, n))
    return {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}, d


def test_objective_uniform_is_mean_of_base_losses(rng):
    inp, d = _inputs(rng)
    loss, m = jax.jit(make_objective("dpo", base_kwargs={"beta": 0.1}))(inp)
    ref = np_dpo(d["policy_chosen_logps"], d["policy_rejected_logps"], d["reference_chosen_logps"],
                 d["reference_rejected_logps"], 0.1, "sigmoid", 0.0).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    assert float(m["weights/ess"]) == pytest.approx(1.0)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "loss"):
        assert key in m


def test_objective_ipo_length_normalised_by_default(rng):
    inp, d = _inputs(rng)
    loss, _ = make_objective("ipo", base_kwargs={"beta": 0.1})(inp)
    nc, nr = d["chosen_n_tokens"], d["rejected_n_tokens"]
    ref = np_dpo(d["policy_chosen_logps"] / nc, d["policy_rejected_logps"] / nr, d["reference_chosen_logps"] / nc,
                 d["reference_rejected_logps"] / nr, 0.1, "ipo", 0.0).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    loss_sum, _ = make_objective("ipo", base_kwargs={"beta": 0.1, "length_normalize": False})(inp)
    ref_sum = np_dpo(d["policy_chosen_logps"], d["policy_rejected_logps"], d["reference_chosen_logps"],
                     d["reference_rejected_logps"], 0.1, "ipo", 0.0).mean()
    np.testing.assert_allclose(float(loss_sum), ref_sum, rtol=1e-5)


def test_objective_data_weights_multiply(rng):
    inp, d = _inputs(rng)
    w = np.linspace(0.0, 2.0, 8)
    loss, _ = make_objective("dpo")({**inp, "weight": jnp.asarray(w, jnp.float32)})
    ref = (w * np_dpo(d["policy_chosen_logps"], d["policy_rejected_logps"], d["reference_chosen_logps"],
                      d["reference_rejected_logps"], 0.1, "sigmoid", 0.0)).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_objective_flags_and_errors():
    assert "reference" not in make_objective("simpo").requires
    assert "kl_completions" in make_objective("kto").requires
    with pytest.raises(ValueError, match="unknown base loss"):
        make_objective("dpoo")
    with pytest.raises(ValueError, match="unknown weighting"):
        make_objective("dpo", weighting="nope")
    with pytest.raises(ValueError, match=r"unknown hyper-parameter\(s\) \['betta'\]"):
        make_objective("dpo", base_kwargs={"betta": 0.1})


def test_objective_requires_declares_its_inputs():
    from alignshift.losses import BASE_LOSSES, REQUIREMENTS, WEIGHTING_RULES

    for spec in [*BASE_LOSSES.values(), *WEIGHTING_RULES.values()]:
        assert spec.requires <= set(REQUIREMENTS)
    assert make_objective("dpo").requires == {"reference"}
    assert make_objective("simpo").requires == set()
    assert make_objective("kto", "kl_dro").requires == {"reference", "kl_completions"}
    assert make_objective("pl", "dora").requires == {"reference", "lists", "source"}
    assert make_objective("rrhf", "wpo").requires == {"lists", "wpo_terms"}
    assert make_objective("lire", "iw_dpo_r").requires == {"lists", "val_batch"}
    # the objective's declaration is the union of its base loss's and its rule's, for every pair
    for base in BASE_LOSSES:
        for rule in WEIGHTING_RULES:
            assert make_objective(base, rule).requires == BASE_LOSSES[base].requires | WEIGHTING_RULES[rule].requires


def test_hparam_specs_match_the_implementing_functions():
    """Every registered base loss / rule / penalty lists exactly its function's keyword
    hyper-parameters, with the same defaults (the specs are what make_objective validates)."""
    import functools
    import inspect

    from alignshift.losses import BASE_LOSSES, WEIGHTING_RULES
    from alignshift.losses.penalties import PENALTIES, PENALTY_HPARAMS

    not_hp = {"val_features", "aux", "data_weight", "axis_name"}

    def kw_defaults(fn):
        ps = inspect.signature(fn).parameters.values()
        return {p.name: p.default for p in ps if p.kind is p.KEYWORD_ONLY and p.name not in not_hp}

    def axis(fn):
        return "axis_name" in inspect.signature(fn).parameters

    for name, spec in BASE_LOSSES.items():
        assert kw_defaults(spec.fn) == {h.name: h.default for h in spec.hparams}, name
        assert axis(spec.fn) == spec.collectives, name
    for name, rule in WEIGHTING_RULES.items():
        fn = rule.objective
        if isinstance(fn, functools.partial):  # a linear rule: its weights function holds the hyper-parameters
            fn = fn.keywords["weights_fn"]
        assert kw_defaults(fn) == {h.name: h.default for h in rule.hparams}, name
        assert axis(fn) == rule.collectives, name
    for name, fn in PENALTIES.items():
        assert kw_defaults(fn) == {h.name: h.default for h in PENALTY_HPARAMS[name]}, name


def test_make_objective_validates_hparam_values():
    from alignshift.losses import HParamError, check_hparams

    for kwargs, problem in [({"beta": 0}, "must be > 0; got 0"), ({"beta": "abc"}, "must be float; got 'abc'"),
                            ({"beta": float("nan")}, "must be finite"), ({"label_smoothing": -0.1}, "must be >= 0")]:
        with pytest.raises(HParamError, match=problem) as e:
            make_objective("dpo", base_kwargs=kwargs)
        assert e.value.group == "base_kwargs" and e.value.key == next(iter(kwargs))
        assert str(e.value).startswith("base loss 'dpo': hyper-parameter")
    with pytest.raises(HParamError, match="'tau' must be > 0") as e:
        make_objective("dpo", "kl_dro", weighting_kwargs={"tau": -1.0})
    assert e.value.group == "weighting_kwargs"
    with pytest.raises(HParamError, match="must be None or float; got 'x'"):
        make_objective("dpo", "kl_dro", weighting_kwargs={"clamp": "x"})
    with pytest.raises(HParamError, match="'rho' must be >= 0") as e:
        make_objective("dpo", penalty="wdpo", penalty_kwargs={"rho": -1.0})
    assert e.value.group == "penalty_kwargs"
    # numbers are interchangeable between int and float; NumPy scalars and traced values pass
    make_objective("dpo", "iw_dpo_l", base_kwargs={"beta": 1}, weighting_kwargs={"iters": 10.0, "gamma": "median"})
    make_objective("dpo", base_kwargs={"beta": np.float32(0.2)})
    jax.jit(lambda b: check_hparams("base", "dpo", {"beta": b}) or b)(0.1)
    # unknown names are reported before values, with the allowed names
    with pytest.raises(ValueError, match=r"weighting 'kl_dro' got unknown hyper-parameter\(s\) \['x'\]; "
                                         r"allowed: \['tau', 'clamp', 'normalize', 'axis_name'\]"):
        make_objective("dpo", "kl_dro", base_kwargs={"beta": 0}, weighting_kwargs={"x": 1})


@pytest.mark.parametrize("rule, kw", [("uniform", {}), ("kl_dro", {"tau": 0.3}), ("dr_dpo", {"beta_prime": 0.5}),
                                      ("dro", {"lam": 0.4}), ("wpo", {})])
def test_logged_weights_are_the_objective_gradient(rng, rule, kw):
    """weights/* are of w = n·∂objective/∂ℓ: the objective's gradient is mean_i w_i·∇ℓ_i."""
    from alignshift.losses import WEIGHTING_RULES, reduce_losses

    L = jnp.asarray(rng.normal(0.7, 0.3, size=8), jnp.float32)
    aux = {"policy_chosen_wpo": jnp.asarray(rng.normal(-1, 0.3, 8), jnp.float32),
           "policy_rejected_wpo": jnp.asarray(rng.normal(-1, 0.3, 8), jnp.float32)}
    rule = WEIGHTING_RULES[rule]
    value, w = reduce_losses(rule, L, aux=aux, **kw)
    assert float(value) == float(rule.objective(L, jax.lax.stop_gradient(L), aux=aux, **kw))
    g = jax.grad(lambda x: reduce_losses(rule, x, aux=aux, **kw)[0])(L)
    np.testing.assert_allclose(np.asarray(w), 8 * np.asarray(g), rtol=1e-6)


# ---------------------------------------------------------------- WPO


def np_wpo_term(logits, labels, mask):
    """ā(y) = mean_t [log p(y_t) − log Σ_v p_v²] over response tokens, float64."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
    lp = np.log(np.take_along_axis(p, labels[..., None], -1)[..., 0])
    adj = lp - np.log((p ** 2).sum(-1))
    return (adj * mask).sum(-1) / mask.sum(-1)


def test_wpo_term_matches_numpy(rng):
    from alignshift.losses.logps import sequence_logps_wpo

    B, T, V = 4, 6, 13
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    labels = rng.integers(0, V, size=(B, T))
    mask = (rng.random((B, T)) > 0.3).astype(np.int32)
    mask[:, 0] = 1
    s, n, a = sequence_logps_wpo(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(a), np_wpo_term(logits, labels, mask), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s), np_sequence_logps(logits, labels, mask)[0], rtol=1e-5)
    # the weight term is detached: only the log-prob sum carries gradient
    g = jax.grad(lambda x: sequence_logps_wpo(x, jnp.asarray(labels), jnp.asarray(mask))[2].sum())(
        jnp.asarray(logits))
    assert not np.any(np.asarray(g))


@pytest.mark.parametrize("clip, normalize", [(1.0, False), (None, False), (None, True)])
def test_wpo_objective_matches_numpy(rng, clip, normalize):
    inp, d = _inputs(rng)
    aw, al = rng.normal(-0.3, 0.4, 8), rng.normal(-0.3, 0.4, 8)
    inp = {**inp, "policy_chosen_wpo": jnp.asarray(aw, jnp.float32), "policy_rejected_wpo": jnp.asarray(al, jnp.float32)}
    obj = make_objective("dpo", "wpo", weighting_kwargs={"clip": clip, "normalize": normalize})
    assert "wpo_terms" in obj.requires
    loss, m = jax.jit(obj)(inp)
    w = np.exp(aw + al)
    if clip is not None:
        w = np.minimum(w, clip)
    if normalize:
        w = w / w.mean()
    ref = (w * np_dpo(d["policy_chosen_logps"], d["policy_rejected_logps"], d["reference_chosen_logps"],
                      d["reference_rejected_logps"], 0.1, "sigmoid", 0.0)).mean()
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    np.testing.assert_allclose(float(m["weights/max"]), w.max(), rtol=1e-5)


# ---------------------------------------------------------------- KL-DRO (KLDPO) and DR-DPO


def _dpo_np(d, beta=0.1):
    return np_dpo(d["policy_chosen_logps"], d["policy_rejected_logps"], d["reference_chosen_logps"],
                  d["reference_rejected_logps"], beta, "sigmoid", 0.0)


@pytest.mark.parametrize("tau, clamp, normalize", [(0.05, 10.0, False), (0.5, None, False), (0.3, None, True),
                                                   (0.1, 3.0, True)])
def test_kl_dro_matches_numpy(rng, tau, clamp, normalize):
    inp, d = _inputs(rng)
    L = _dpo_np(d)
    if normalize:
        w = len(L) * np.exp(L / tau - np.max(L / tau)) / np.exp(L / tau - np.max(L / tau)).sum()
        if clamp is not None:
            w = np.minimum(w, clamp)
    else:
        w = np.exp(np.minimum((L - L.mean()) / tau, np.log(clamp) if clamp else 80.0))
    obj = make_objective("dpo", "kl_dro", weighting_kwargs=dict(tau=tau, clamp=clamp, normalize=normalize))
    loss, m = jax.jit(obj)(inp)
    np.testing.assert_allclose(float(loss), np.mean(w * L), rtol=2e-5)
    np.testing.assert_allclose(float(m["weights/max"]), w.max(), rtol=2e-5)


def test_kl_dro_large_tau_is_the_base_loss(rng):
    inp, d = _inputs(rng)
    for normalize in (True, False):
        loss, _ = make_objective("dpo", "kl_dro", weighting_kwargs=dict(tau=1e7, normalize=normalize))(inp)
        np.testing.assert_allclose(float(loss), _dpo_np(d).mean(), rtol=1e-5)


def test_kl_dro_gradient_is_that_of_log_mean_exp(rng):
    """Envelope theorem: ∇ mean(w·L) with w = n·softmax(L/τ) detached = ∇ τ·log mean exp(L/τ)."""
    inp, _ = _inputs(rng)
    tau = 0.3
    obj = make_objective("dpo", "kl_dro", weighting_kwargs=dict(tau=tau, clamp=None, normalize=True))
    base = make_objective("dpo")

    def lme(pc):
        L = base.terms({**inp, "policy_chosen_logps": pc})[0].losses
        return tau * (jax.nn.logsumexp(L / tau) - jnp.log(L.shape[0]))

    g_obj = jax.grad(lambda pc: obj({**inp, "policy_chosen_logps": pc})[0])(inp["policy_chosen_logps"])
    np.testing.assert_allclose(np.asarray(g_obj), np.asarray(jax.grad(lme)(inp["policy_chosen_logps"])),
                               rtol=1e-5, atol=1e-7)


def test_dr_dpo_value_grad_and_weights(rng):
    inp, d = _inputs(rng)
    bp = 0.7
    obj = make_objective("dpo", "dr_dpo", weighting_kwargs=dict(beta_prime=bp))
    loss, m = jax.jit(obj)(inp)

    def np_obj(pc):
        L = np_dpo(pc, d["policy_rejected_logps"], d["reference_chosen_logps"], d["reference_rejected_logps"],
                   0.1, "sigmoid", 0.0)
        return -bp * np.log(np.mean(np.exp(-L / bp)))

    np.testing.assert_allclose(float(loss), np_obj(d["policy_chosen_logps"]), rtol=1e-5)
    g = jax.grad(lambda pc: obj({**inp, "policy_chosen_logps": pc})[0])(inp["policy_chosen_logps"])
    np.testing.assert_allclose(np.asarray(g), fd_grad(np_obj, d["policy_chosen_logps"]), rtol=1e-4, atol=1e-7)
    L = _dpo_np(d)
    w = len(L) * np.exp(-L / bp) / np.exp(-L / bp).sum()
    np.testing.assert_allclose(float(m["weights/max"]), w.max(), rtol=1e-5)
    assert np.argmax(w) == np.argmin(L)  # soft-min: the lowest-loss pair weighs most


@pytest.mark.parametrize("rule, kw", [("kl_dro", dict(tau=0.2)), ("kl_dro", dict(tau=0.2, normalize=True)),
                                      ("dr_dpo", dict(beta_prime=0.5))])
def test_batch_rules_with_axis_name_equal_global(rng, rule, kw):
    """Split the batch over a named axis: collectives make the weights equal the global ones."""
    from alignshift.losses.reduction import reduce_losses
    from alignshift.losses.weighting import WEIGHTING_RULES

    L = jnp.asarray(rng.normal(0.7, 0.3, size=16), jnp.float32)
    fn = lambda x, **hp: reduce_losses(WEIGHTING_RULES[rule], x, **hp)[1]  # noqa: E731 - the logged weights
    w_global = fn(L, **kw)
    w_split = jax.vmap(lambda x: fn(x, axis_name="dev", **kw), axis_name="dev")(L.reshape(4, 4))
    np.testing.assert_allclose(np.asarray(w_split).reshape(-1), np.asarray(w_global), rtol=1e-6)


# ---------------------------------------------------------------- IW-DPO rules


def test_iw_rules_warmup_then_kmm_weights(rng):
    """Uniform during warm-up; afterwards the normalised KMM weights of the chosen features."""
    from alignshift.losses.kmm import kmm_weights

    inp, d = _inputs(rng)
    val, _ = _inputs(np.random.default_rng(1), n=4)
    L = _dpo_np(d)
    for rule in ("iw_dpo_l", "iw_dpo_r"):
        obj = make_objective("dpo", rule, weighting_kwargs={"warmup_examples": 16, "gamma": 1.0})
        assert "val_batch" in obj.requires
        with pytest.raises(ValueError, match="needs a validation batch"):
            obj({**inp, "step": jnp.int32(5)})
        loss0, m0 = obj({**inp, "step": jnp.int32(1)}, val)  # 1 step x 8 examples < 16: warm-up
        np.testing.assert_allclose(float(loss0), L.mean(), rtol=1e-5)
        assert float(m0["weights/ess"]) == pytest.approx(1.0)
        loss, m = jax.jit(obj)({**inp, "step": jnp.int32(2)}, val)
        tr, va = obj.terms(inp)[0], obj.terms(val)[0]
        if rule == "iw_dpo_l":
            f_tr, f_va = tr.losses, va.losses
        else:
            f_tr = jnp.stack([tr.chosen_rewards, tr.rejected_rewards], -1)
            f_va = jnp.stack([va.chosen_rewards, va.rejected_rewards], -1)
        w = np.asarray(kmm_weights(f_tr, f_va, gamma=1.0))
        w = w / w.mean()
        np.testing.assert_allclose(float(loss), np.mean(w * L), rtol=1e-4)
        assert float(m["weights/ess"]) < 1.0  # non-uniform after warm-up
