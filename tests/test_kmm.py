"""KMM importance weights against float64 SciPy / NumPy references."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import Bounds, LinearConstraint, minimize
from scipy.stats import norm

from alignshift.losses.kmm import (
    kernel_gamma,
    kmm_objective,
    kmm_weights,
    lipschitz_bound,
    project_box_slab,
    rbf_kernel,
)
from alignshift.losses.weighting import normalize_weights

# ---------------------------------------------------------------- float64 references


def np_sqdist(a, b):
    a = np.asarray(a, np.float64).reshape(len(a), -1)
    b = np.asarray(b, np.float64).reshape(len(b), -1)
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)


def np_problem(a, c, gamma):
    n, m = len(a), len(c)
    K = np.exp(-gamma * np_sqdist(a, a))
    kappa = (n / m) * np.exp(-gamma * np_sqdist(a, c)).sum(1)
    return K, kappa


def np_objective(w, K, kappa, ridge):
    w = np.asarray(w, np.float64)
    return 0.5 * w @ K @ w + 0.5 * ridge * w @ w - kappa @ w


def scipy_qp(K, kappa, ridge, B, lo, hi):
    """The same QP in float64 with SLSQP (box bounds + two linear inequalities)."""
    n = len(kappa)
    H = K + ridge * np.eye(n)
    cons = [
        {"type": "ineq", "fun": lambda w: w.sum() - lo, "jac": lambda w: np.ones(n)},
        {"type": "ineq", "fun": lambda w: hi - w.sum(), "jac": lambda w: -np.ones(n)},
    ]
    res = minimize(
        lambda w: 0.5 * w @ H @ w - kappa @ w,
        np.clip(np.ones(n), 0, B),
        jac=lambda w: H @ w - kappa,
        bounds=[(0.0, B)] * n,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-12, "maxiter": 3000},
    )
    if not res.success:  # fall back to the interior-point-like trust-constr
        res = minimize(
            lambda w: 0.5 * w @ H @ w - kappa @ w,
            np.clip(np.ones(n), 0, B),
            jac=lambda w: H @ w - kappa,
            hess=lambda w: H,
            bounds=Bounds(0.0, B),
            constraints=[LinearConstraint(np.ones((1, n)), lo, hi)],
            method="trust-constr",
            options={"gtol": 1e-12, "xtol": 1e-14, "maxiter": 5000},
        )
    assert res.success, res.message
    return res.x, res.fun


def np_project(v, B, lo, hi):
    """Sorting-based exact projection onto {0 <= w <= B, lo <= sum w <= hi} (float64)."""
    v = np.asarray(v, np.float64)
    w = np.clip(v, 0, B)
    s = w.sum()
    if lo <= s <= hi:
        return w
    target = lo if s < lo else hi
    f = lambda mu: np.clip(v - mu, 0, B).sum()  # noqa: E731, non-increasing, piecewise linear
    bps = np.unique(np.concatenate([v, v - B]))  # ascending breakpoints
    vals = np.array([f(b) for b in bps])  # non-increasing
    k = np.searchsorted(-vals, -target, side="right") - 1  # last bp with f >= target
    k = min(max(k, 0), len(bps) - 2)
    b0, b1, f0, f1 = bps[k], bps[k + 1], vals[k], vals[k + 1]
    mu = b0 if f0 == f1 else b0 + (f0 - target) * (b1 - b0) / (f0 - f1)
    return np.clip(v - mu, 0, B)


def slab(n, eps=None):
    eps = (np.sqrt(n) - 1) / np.sqrt(n) if eps is None else eps
    return n * (1 - eps), n * (1 + eps)


def assert_feasible(w, B, lo, hi, tol=1e-4):
    w = np.asarray(w, np.float64)
    assert np.all(np.isfinite(w))
    assert w.min() >= -tol and w.max() <= B + tol
    assert lo - tol <= w.sum() <= hi + tol, (w.sum(), lo, hi)


@functools.lru_cache(maxsize=None)
def jitted(iters=500, ridge=0.1, upper_bound=50.0, eps=None):
    return jax.jit(
        lambda a, c, g: kmm_weights(a, c, gamma=g, ridge=ridge, upper_bound=upper_bound, eps=eps, iters=iters)
    )


# ---------------------------------------------------------------- kernel and gamma


@pytest.mark.parametrize("d", [None, 1, 3])
def test_rbf_kernel_matches_numpy(d):
    rng = np.random.default_rng(0)
    shape_a, shape_b = ((7,), (5,)) if d is None else ((7, d), (5, d))
    a, b = rng.normal(size=shape_a), rng.normal(size=shape_b)
    K = rbf_kernel(a, b, 0.7)
    chex.assert_shape(K, (7, 5))
    chex.assert_type(K, jnp.float32)
    np.testing.assert_allclose(K, np.exp(-0.7 * np_sqdist(a, b)), rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(np.diag(rbf_kernel(a, a, 0.7)), 1.0)


def test_kernel_gamma_options():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 2))
    iu = np.triu_indices(20, 1)
    d2 = np_sqdist(a, a)[iu]
    np.testing.assert_allclose(kernel_gamma(a, "median"), 1.0 / np.median(d2), rtol=1e-5)
    # DIW's get_kernel_width: numpy.quantile of pairwise Euclidean distances (i < j), q = 0.01.
    np.testing.assert_allclose(kernel_gamma(a, "diw_quantile"), np.quantile(np.sqrt(d2), 0.01), rtol=1e-5)
    assert float(kernel_gamma(a, 0.3)) == pytest.approx(0.3)
    # Degenerate (all-equal) features: finite gammas.
    same = np.full((10,), 0.6931)
    assert np.isfinite(kernel_gamma(same, "median")) and np.isfinite(kernel_gamma(same, "diw_quantile"))
    with pytest.raises(ValueError):
        kernel_gamma(a, "nope")


def test_lipschitz_bound_is_safe_and_tight():
    rng = np.random.default_rng(2)
    for n, g in [(64, 0.1), (64, 1e-4), (64, 10.0), (32, 100.0)]:
        a = rng.normal(size=(n, 2))
        K = rbf_kernel(a, a, g)
        lam = np.linalg.eigvalsh(np.asarray(K, np.float64)).max()
        bound = float(lipschitz_bound(K))
        assert lam * (1 - 1e-6) <= bound <= lam * 1.01 + 1e-6, (n, g, lam, bound)


# ---------------------------------------------------------------- projection


@pytest.mark.parametrize(
    "scale,shift,B,lo,hi",
    [
        (20.0, 0.0, 50.0, 8.0, 120.0),  # mostly inside
        (1.0, -3.0, 50.0, 8.0, 120.0),  # sum below lo
        (30.0, 20.0, 50.0, 8.0, 120.0),  # sum above hi, some at B
        (3.0, 2.0, 2.5, 60.0, 62.0),  # tight box and slab
        (1.0, 0.5, 50.0, 64.0, 64.0),  # equality (eps = 0)
    ],
)
def test_projection_matches_sorting_reference(scale, shift, B, lo, hi):
    rng = np.random.default_rng(3)
    for _ in range(5):
        v = (rng.normal(size=64) * scale + shift).astype(np.float32)
        w = project_box_slab(v, B, lo, hi)
        chex.assert_shape(w, (64,))
        chex.assert_type(w, jnp.float32)
        ref = np_project(v, B, lo, hi)
        np.testing.assert_allclose(w, ref, rtol=0, atol=2e-5 * max(1.0, np.abs(v).max()))
        assert_feasible(w, B, lo, hi, tol=4 * np.finfo(np.float32).eps * max(hi, 1.0))
        # Idempotent, and the variational inequality <v - P v, u - P v> <= 0 for feasible u.
        np.testing.assert_allclose(project_box_slab(w, B, lo, hi), w, rtol=0, atol=1e-5)
        for _ in range(3):
            u = np_project(rng.uniform(0, B, size=64), B, lo, hi)
            r = np.asarray(v, np.float64) - np.asarray(w, np.float64)
            assert r @ (u - np.asarray(w, np.float64)) <= 1e-3 * (1 + np.abs(r).sum())


# ---------------------------------------------------------------- QP against SciPy


@pytest.mark.parametrize("n", [16, 64])
@pytest.mark.parametrize("m", [4, 16])
@pytest.mark.parametrize("d", [1, 2])
def test_matches_scipy_qp(n, m, d):
    rng = np.random.default_rng(100 * n + 10 * m + d)
    a = rng.normal(size=(n, d)).astype(np.float32)
    c = rng.normal(loc=0.8, scale=0.7, size=(m, d)).astype(np.float32)
    lo, hi = slab(n)
    # 1e-4: K ~ all ones (nearly degenerate); 100: K ~ identity; plus the median heuristic.
    for gamma in [1e-4, 0.1, 1.0, 100.0, float(kernel_gamma(a, "median"))]:
        w = jitted()(a, c, gamma)
        chex.assert_shape(w, (n,))
        chex.assert_type(w, jnp.float32)
        K, kappa = np_problem(a, c, gamma)
        _, f_ref = scipy_qp(K, kappa, 0.1, 50.0, lo, hi)
        f = np_objective(w, K, kappa, 0.1)
        assert abs(f - f_ref) <= 1e-5 * max(abs(f_ref), 1.0), (gamma, f, f_ref)
        assert_feasible(w, 50.0, lo, hi)
        # The float32 helper agrees with the float64 objective.
        f32 = kmm_objective(w, jnp.asarray(K, jnp.float32), jnp.asarray(kappa, jnp.float32), 0.1)
        assert abs(float(f32) - f) <= 1e-5 * max(abs(f), 1.0)


def test_matches_scipy_active_box_and_slab():
    """Small B and ε so that upper bounds and the slab are active at the optimum."""
    rng = np.random.default_rng(7)
    n, m, B, eps = 32, 8, 2.0, 0.05
    a = rng.normal(size=(n, 2)).astype(np.float32)
    c = rng.normal(loc=1.0, scale=0.5, size=(m, 2)).astype(np.float32)
    lo, hi = slab(n, eps)
    K, kappa = np_problem(a, c, 0.5)
    w_ref, f_ref = scipy_qp(K, kappa, 0.1, B, lo, hi)
    w = jitted(upper_bound=B, eps=eps)(a, c, 0.5)
    assert np.sum(np.asarray(w) >= B - 1e-6) >= 1 and np.sum(np.asarray(w) <= 1e-6) >= 1
    assert abs(np_objective(w, K, kappa, 0.1) - f_ref) <= 1e-5 * abs(f_ref)
    assert_feasible(w, B, lo, hi)
    np.testing.assert_allclose(w, w_ref, atol=1e-3)  # strongly convex: unique minimiser


def test_matches_scipy_diw_ridge():
    """DIW's jitter (ridge = 1e-5) is ill-conditioned: needs far more iterations (see report)."""
    rng = np.random.default_rng(8)
    n, m = 16, 8
    a = rng.normal(size=(n, 1)).astype(np.float32)
    c = rng.normal(loc=0.5, size=(m, 1)).astype(np.float32)
    lo, hi = slab(n)
    K, kappa = np_problem(a, c, 0.5)
    _, f_ref = scipy_qp(K, kappa, 1e-5, 50.0, lo, hi)
    w = jitted(iters=4000, ridge=1e-5)(a, c, 0.5)
    assert abs(np_objective(w, K, kappa, 1e-5) - f_ref) <= 1e-5 * abs(f_ref)
    assert_feasible(w, 50.0, lo, hi)


def test_closed_form_option():
    rng = np.random.default_rng(9)
    n, m = 24, 8
    a = rng.normal(size=(n,))
    c = rng.normal(loc=1.0, size=(m,))
    K, kappa = np_problem(a.astype(np.float32), c.astype(np.float32), 0.1)
    ref = np.clip(np.linalg.solve(K + 0.1 * n * np.eye(n), kappa), 0, 50)
    w = kmm_weights(a, c, solver="closed_form")
    chex.assert_shape(w, (n,))
    chex.assert_type(w, jnp.float32)
    np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError):
        kmm_weights(a, c, solver="cvxopt")


# ---------------------------------------------------------------- behaviour


def test_same_distribution_gives_near_uniform_weights():
    rng = np.random.default_rng(10)
    n = 64
    a1 = norm.ppf((np.arange(n) + 0.5) / n)  # stratified draw from N(0, 1)
    q = norm.ppf((np.arange(8) + 0.5) / 8)
    a2 = np.stack(np.meshgrid(q, q), -1).reshape(-1, 2)  # stratified draw from N(0, I_2)
    for a, tol in [(a1, 0.1), (a2, 0.2)]:
        c = rng.normal(size=(1024,) + a.shape[1:])
        w = np.asarray(normalize_weights(kmm_weights(a, c)))
        assert np.abs(w - 1).mean() < tol, np.abs(w - 1).mean()
    # Contrast: a shifted deployment distribution moves the weights far from 1.
    w = np.asarray(normalize_weights(kmm_weights(a1, rng.normal(loc=1.0, size=1024))))
    assert np.abs(w - 1).mean() > 0.5


def test_mass_concentrates_on_matching_subset():
    rng = np.random.default_rng(11)
    a = np.concatenate([rng.normal(-3, 0.5, 32), rng.normal(3, 0.5, 32)])
    for c in [a[:32], a[:16], rng.normal(-3, 0.5, 16)]:  # val = (a subset of) cluster A
        w = np.asarray(kmm_weights(a, c))
        assert w[:32].mean() > 1.5 and w[32:].mean() < 0.05, (w[:32].mean(), w[32:].mean())
        assert_feasible(w, 50.0, *slab(64))


@pytest.mark.parametrize("gamma", [0.1, "median", "diw_quantile"])
def test_degenerate_all_equal_features(gamma):
    n = 32
    a = np.full((n,), np.log(2.0), np.float32)  # DPO losses at initialisation
    c = np.full((8,), np.log(2.0), np.float32)
    w = np.asarray(kmm_weights(a, c, gamma=gamma))
    assert_feasible(w, 50.0, *slab(n))
    # K = all ones: the exact solution is uniform, w_i = n / (n + ridge).
    np.testing.assert_allclose(w, n / (n + 0.1), rtol=1e-4)
    # Different (but still constant) validation features: still uniform and finite.
    w = np.asarray(kmm_weights(a, c + 1.0, gamma=gamma))
    assert_feasible(w, 50.0, *slab(n))
    assert np.ptp(w) < 1e-4 * w.mean()


# ---------------------------------------------------------------- JAX plumbing


def test_jit_vmap_stop_gradient_and_contract():
    rng = np.random.default_rng(12)
    n, m = 16, 6
    x = jnp.asarray(rng.normal(size=(n, 2)), jnp.float32)
    c = jnp.asarray(rng.normal(loc=0.5, size=(m, 2)), jnp.float32)
    w_eager = kmm_weights(x, val_features=c, aux=None, iters=200)  # weighting-rule contract
    w_jit = jax.jit(functools.partial(kmm_weights, iters=200))(x, c)
    chex.assert_shape(w_jit, (n,))
    chex.assert_type(w_jit, jnp.float32)
    np.testing.assert_allclose(w_jit, w_eager, rtol=1e-5, atol=1e-6)
    # float64 input -> float32 output.
    chex.assert_type(kmm_weights(np.asarray(x, np.float64), np.asarray(c, np.float64), iters=10), jnp.float32)

    # Weights carry no gradient: d/dx sum(w(x)) = 0 and d/dx sum(w(x) * l(x)) = w * l'(x).
    g0 = jax.grad(lambda f: kmm_weights(f, c, iters=50).sum())(x)
    np.testing.assert_array_equal(g0, 0.0)
    g_val = jax.grad(lambda v: kmm_weights(x, v, iters=50).sum())(c)
    np.testing.assert_array_equal(g_val, 0.0)
    loss = lambda f: jnp.sum(kmm_weights(f, c, iters=50) * jnp.sum(f**2, axis=1))  # noqa: E731
    g = jax.grad(loss)(x)
    w = kmm_weights(x, c, iters=50)
    np.testing.assert_allclose(g, 2.0 * w[:, None] * x, rtol=1e-6)

    # vmap over independent problems (the projection's lax.cond becomes a select).
    xs = jnp.stack([x, x + 1.0])
    ws = jax.vmap(lambda f: kmm_weights(f, c, iters=200))(xs)
    chex.assert_shape(ws, (2, n))
    np.testing.assert_allclose(ws[0], w_eager, rtol=1e-5, atol=1e-6)

    with pytest.raises(ValueError):
        kmm_weights(x)  # needs a validation batch


def test_early_stop_at_tol():
    """FISTA stops once converged (default tol 1e-6): the same objective as the full 500
    iterations (tol=0) to float32 precision, and a loose tol really stops earlier (worse)."""
    rng = np.random.default_rng(11)
    for n, d, gamma in [(32, 1, 0.1), (32, 2, 1.0), (64, 2, "median")]:
        a = rng.normal(size=(n, d)).astype(np.float32)
        c = rng.normal(loc=0.7, scale=0.8, size=(12, d)).astype(np.float32)
        g = float(kernel_gamma(a, "median")) if gamma == "median" else gamma
        K, kappa = np_problem(a, c, g)
        f = {tol: np_objective(kmm_weights(a, c, gamma=g, tol=tol), K, kappa, 0.1) for tol in (0.0, 1e-6, 1e-1)}
        scale = max(abs(f[0.0]), 1.0)
        assert abs(f[1e-6] - f[0.0]) <= 1e-6 * scale, (n, d, f)
        assert f[1e-1] - f[0.0] > 1e-6 * scale, (n, d, f)
