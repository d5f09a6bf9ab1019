"""Issue 19's recipe fixes, each checked against a float64 NumPy reference or the configs.

KLDPO's step-size confound (the authors' unnormalised tilt = mean(u) x the normalised one) and
its ``normalize: true`` rows next to every authors'-form row.
"""

from __future__ import annotations

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignshift.dryrun import load_plan_config
from alignshift.losses import make_objective

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.yaml")))


def _name(p):
    return os.path.splitext(os.path.basename(p))[0]


def _dpo_inputs(rng, n=16):
    f = lambda: jnp.asarray(rng.normal(-5.0, 1.5, size=n), jnp.float32)  # noqa: E731
    return {"policy_chosen_logps": f(), "policy_rejected_logps": f(), "reference_chosen_logps": f(),
            "reference_rejected_logps": f()}


def _np_dpo_losses(inp, beta):
    x = {k: np.asarray(v, np.float64) for k, v in inp.items()}
    h = (x["policy_chosen_logps"] - x["reference_chosen_logps"]) - (x["policy_rejected_logps"] - x["reference_rejected_logps"])
    return np.logaddexp(0.0, -beta * h)


# ------------------------------------------------------------------ 1. KLDPO's step size

@pytest.mark.parametrize("tau", [0.05, 0.3])
def test_kldpo_unnormalised_gradient_is_mean_u_times_normalised(tau):
    """Without the clamp the authors' tilt u = c·n·softmax(L/τ), c = mean exp((L − L̄)/τ) ≥ 1:
    its gradient is c times the normalised form's (the step-size confound), checked against
    float64 NumPy."""
    rng = np.random.default_rng(0)
    inp = _dpo_inputs(rng)
    beta = 0.5
    L = _np_dpo_losses(inp, beta)
    c = np.mean(np.exp((L - L.mean()) / tau))
    assert c >= 1.0
    grads = {}
    for normalize in (False, True):
        obj = make_objective("dpo", "kl_dro", base_kwargs={"beta": beta},
                             weighting_kwargs={"tau": tau, "clamp": None, "normalize": normalize})
        grads[normalize] = np.asarray(jax.grad(lambda p: obj({**inp, "policy_chosen_logps": p})[0])(
            inp["policy_chosen_logps"]), np.float64)
    np.testing.assert_allclose(grads[False], c * grads[True], rtol=2e-4, atol=1e-7)
    # the normalised weights have mean 1: the step is the DPO step's size on average
    w = len(L) * np.exp(L / tau - np.logaddexp.reduce(L / tau))
    np.testing.assert_allclose(w.mean(), 1.0, rtol=1e-12)


def test_kldpo_clamped_step_multiplier_is_at_most_the_clamp():
    rng = np.random.default_rng(1)
    inp = _dpo_inputs(rng, 32)
    L = _np_dpo_losses(inp, 1.0)
    u = np.minimum(np.exp((L - L.mean()) / 0.05), 10.0)
    obj = make_objective("dpo", "kl_dro", base_kwargs={"beta": 1.0}, weighting_kwargs={"tau": 0.05})
    _, m = obj(inp)
    assert 1.0 <= u.mean() <= 10.0
    assert float(m["weights/max"]) == pytest.approx(u.max(), rel=1e-4)


def _kl_dro_rows(cfg):
    return [m for m in cfg.methods if m.weighting == "kl_dro"]


@pytest.mark.parametrize("path", CONFIGS, ids=_name)
def test_every_authors_form_kldpo_row_has_a_normalised_sibling(path):
    """Every config that runs KLDPO in the authors' form (unnormalised) also runs the same tilt
    (same base, β, τ, clamp, data) with ``normalize: true``."""
    cfg, _ = load_plan_config(path)  # script sections (DoRA's classifier, FLR's flr) dropped
    rows = _kl_dro_rows(cfg)

    def key(m):
        kw = {k: v for k, v in m.weighting_kwargs.items() if k != "normalize"}
        return (m.base, tuple(sorted(m.base_kwargs.items())), tuple(sorted(kw.items())), m.train_data)

    normalised = {key(m) for m in rows if m.weighting_kwargs.get("normalize", False)}
    for m in rows:
        if not m.weighting_kwargs.get("normalize", False):
            assert key(m) in normalised, f"{_name(path)}: {m.name} has no normalize: true sibling"
