"""Property tests (hypothesis) for every base loss and every weighting rule in the registries:
the objective and its gradient stay finite for extreme log-prob values, batch size 1,
all-equal features (KMM), and the temperatures / regularisers (τ, λ, β', β) at their limits;
rule weights are finite and non-negative.

All losses (and, separately, all rules) x hyper-parameter limits are evaluated by ONE jitted
function, compiled once per batch size (1 and 3); hypothesis varies only the values, so the
file stays fast; ``max_examples`` is small.
"""

from __future__ import annotations

from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from alignshift.losses.objective import BASE_LOSSES, hparam_specs, make_objective
from alignshift.losses.weighting import WEIGHTING_RULES

SETTINGS = settings(max_examples=8, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# log-probs: sums over tokens are <= 0; extremes include a token budget's worth of -inf-ish
# mass (-1e4), exact ties and float32-tiny differences
LOGP = st.sampled_from([0.0, -1e-30, -1e-6, -0.5, -1.0, -3.0, -50.0, -1e3, -1e4, -3e4])
BATCH = st.sampled_from([1, 3])

# hyper-parameters at their limits, per name (a variant sets one of them; others default)
LIMITS = {
    "beta": (1e-3, 1e3),
    "temperature": (1e-3, 1e3),
    "tau": (1e-3, 1e3),
    "beta_prime": (1e-3, 1e3),
    "lam": (1e-3, 1e4),
    "label_smoothing": (0.0, 0.45),
    "ridge": (1e-5,),
    "gamma": ("median",),
}


def _variants(params, skip=()) -> list[dict]:
    """One variant per limit of each hyper-parameter in ``params`` (the defaults lie between
    the limits, so they are not evaluated again); ``[{}]`` when it has none."""
    out = []
    for name, vals in LIMITS.items():
        if name in params and name not in skip:
            out += [{name: v} for v in vals]
    return out or [{}]


def _inputs(draw_vals, b: int) -> dict:
    """Pairwise objective inputs of batch ``b`` from drawn values (all float32)."""
    f = lambda k: jnp.asarray(np.asarray(draw_vals[k][:b], np.float32))  # noqa: E731
    n_c = jnp.asarray(np.asarray(draw_vals["n"][:b], np.float32))
    return {
        "policy_chosen_logps": f("pc"), "policy_rejected_logps": f("pr"),
        "reference_chosen_logps": f("rc"), "reference_rejected_logps": f("rr"),
        "policy_kl_logps": f("pk"), "reference_kl_logps": f("rk"),
        "chosen_n_tokens": n_c, "rejected_n_tokens": n_c[::-1],
        "policy_chosen_wpo": f("pc") / n_c, "policy_rejected_wpo": f("pr") / n_c,
        "source_prob": jnp.stack([f("sp"), f("sp")[::-1]], -1),
        "source_share": jnp.full((b, 2), 0.5, jnp.float32),
        "step": jnp.asarray(10_000, jnp.int32),  # past IW's warm-up
    }


DRAW = st.fixed_dictionaries({
    **{k: st.lists(LOGP, min_size=3, max_size=3) for k in ("pc", "pr", "rc", "rr", "pk", "rk")},
    "n": st.lists(st.sampled_from([1.0, 7.0, 4096.0]), min_size=3, max_size=3),
    "sp": st.lists(st.sampled_from([1e-6, 0.01, 0.5, 0.999, 1.0]), min_size=3, max_size=3),
})


def _base_cases():
    return [(b, "uniform", hp, "base") for b in sorted(BASE_LOSSES)
            for hp in _variants(hparam_specs("base", b), skip=("gamma",) if b in ("dpo", "cdpo", "robust")
                                else ("gamma", "label_smoothing"))]


def _rule_cases():
    out = []
    for w in sorted(WEIGHTING_RULES):
        params = hparam_specs("weighting", w)
        extra = {"iters": 50} if "iters" in params else {}  # KMM: fewer FISTA steps
        out += [("dpo", w, {**extra, **hp}, "weighting") for hp in _variants(params)]
    return out


def _name(case) -> str:
    base, w, hp, _ = case
    return f"{base}/{w}/{hp}"


@lru_cache(maxsize=None)
def _compiled(kind: str):
    """ONE jitted function evaluating every case of ``kind`` (all bases or all rules, every
    hyper-parameter limit): compiled once per batch size, so hypothesis only varies values."""
    cases = _base_cases() if kind == "base" else _rule_cases()
    objs = {}
    for case in cases:
        base, w, hp, which = case
        kw = dict(base_kwargs=hp) if which == "base" else dict(weighting_kwargs=hp)
        objs[_name(case)] = (make_objective(base, w, **kw), "val_batch" in WEIGHTING_RULES[w].requires)

    def run(inputs, val):
        out = {}
        for name, (obj, needs_val) in objs.items():
            def loss(pc, pr):
                return obj({**inputs, "policy_chosen_logps": pc, "policy_rejected_logps": pr},
                           val if needs_val else None)
            (value, metrics), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
                inputs["policy_chosen_logps"], inputs["policy_rejected_logps"])
            out[name] = (value, grads, {k: v for k, v in metrics.items() if k.startswith("weights/")})
        return out

    return jax.jit(run)


def _check(kind, vals, b, val_vals):
    inputs = _inputs(vals, b)
    val = _inputs(val_vals, b)
    results = jax.device_get(_compiled(kind)(inputs, val))
    where = f"B={b} inputs={vals}"
    for name, (value, grads, w) in results.items():
        assert np.isfinite(value), f"{name}: non-finite objective {value} at {where}"
        for g in grads:
            assert np.all(np.isfinite(g)), f"{name}: non-finite gradient {g} at {where}"
        for k, v in w.items():
            assert np.isfinite(v), f"{name}: non-finite {k} at {where}"
        if "weights/min" in w:
            assert w["weights/min"] >= 0.0, f"{name}: negative weight at {where}"
        if vals["tie"] and "/iw_dpo" in name:  # all-equal KMM features: equal weights
            np.testing.assert_allclose([w["weights/min"], w["weights/max"]], 1.0, rtol=1e-4, err_msg=name)


TIED = DRAW.flatmap(lambda d: st.booleans().map(
    lambda tie: {**({k: [v[0]] * len(v) for k, v in d.items()} if tie else d), "tie": tie}))


@SETTINGS
@given(vals=TIED, val_vals=DRAW, b=BATCH)
def test_every_base_loss_is_finite_at_extremes(vals, val_vals, b):
    """Every base loss in BASE_LOSSES, at β (and the other temperatures) at both limits."""
    _check("base", vals, b, val_vals)


@SETTINGS
@given(vals=TIED, val_vals=DRAW, b=BATCH)
def test_every_weighting_rule_is_finite_at_extremes(vals, val_vals, b):
    """Every weighting rule in WEIGHTING_RULES (with DPO), at τ / λ / β' / γ at their limits;
    ``tie`` draws a batch whose rows are all equal (KMM's degenerate all-equal features)."""
    _check("rule", vals, b, val_vals)


def test_registries_are_covered():
    names = {_name(c).split("/")[0] for c in _base_cases()} | {_name(c).split("/")[1] for c in _rule_cases()}
    assert set(BASE_LOSSES) <= names and set(WEIGHTING_RULES) <= names
    assert any("lam" in c[2] for c in _rule_cases()) and any("tau" in c[2] for c in _rule_cases())
