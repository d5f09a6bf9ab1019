"""DoRA: calibration weights, the calibrated log-mean-exp objective and its ablations (against
float64 NumPy references and jax.grad), composition with every base loss by config, and the
source classifier's calibration report."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from alignshift.losses import BASE_LOSSES, make_objective
from alignshift.losses.dora import dora_calibration, dora_objective
from alignshift.losses.reduction import log_mean_exp, reduce_losses
from alignshift.losses.weighting import WEIGHTING_RULES

# ---------------------------------------------------------------- float64 NumPy references


def np_h(p, alpha, a):
    p, a = np.asarray(p, np.float64), np.asarray(a, np.float64)
    return 1.0 / (alpha + a * (1.0 - p) / p)


def np_lme(x, lam):
    x = np.asarray(x, np.float64) / lam
    m = x.max()
    return lam * (m + np.log(np.mean(np.exp(x - m))))


def np_softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------- calibration weight


def test_dora_calibration_matches_numpy_and_is_bounded():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 1.0, size=200)
    a = rng.uniform(0.0, 2.0, size=200)
    for alpha in (0.05, 0.25, 0.5, 1.0):
        h = np.asarray(dora_calibration(jnp.asarray(p, jnp.float32), alpha=alpha, source_share=jnp.asarray(a, jnp.float32)))
        np.testing.assert_allclose(h, np_h(p, alpha, a), rtol=1e-5)
        assert np.all(h >= 0) and np.all(h <= 1.0 / alpha * (1 + 1e-6))
    # endpoints: p = 1 gives 1/α whatever the source share; p -> 0 gives 0
    assert float(dora_calibration(1.0, alpha=0.25, source_share=0.75)) == pytest.approx(4.0)
    assert float(dora_calibration(0.0, alpha=0.25, source_share=0.75)) < 1e-5
    # the authors' K = 4 settings (every slot coefficient 1/4): h̃ = 4p
    np.testing.assert_allclose(np.asarray(dora_calibration(jnp.asarray(p), alpha=0.25, source_share=0.25)), 4 * p,
                               rtol=1e-5)
    # a pooled, class-balanced classifier with a = 1 − α gives the density ratio dQ0/dP exactly:
    # c/(1−c) = Q0/Qs  =>  h̃ = Q0 / (α Q0 + (1−α) Qs)
    q0, qs = rng.uniform(0.1, 2, 50), rng.uniform(0.1, 2, 50)
    c = q0 / (q0 + qs)
    np.testing.assert_allclose(np.asarray(dora_calibration(jnp.asarray(c), alpha=0.3, source_share=0.7)),
                               q0 / (0.3 * q0 + 0.7 * qs), rtol=1e-5)


def test_dora_calibration_rejects_bad_input():
    with pytest.raises(ValueError, match="alpha"):
        dora_calibration(0.5, alpha=0.0, source_share=0.5)
    with pytest.raises(ValueError, match="alpha"):
        dora_calibration(0.5, alpha=1.5, source_share=0.5)
    with pytest.raises(ValueError, match=r"p \(classifier probability"):
        dora_calibration(jnp.asarray([0.5, 1.2]), alpha=0.5, source_share=0.5)
    with pytest.raises(ValueError, match="source_share"):
        dora_calibration(0.5, alpha=0.5, source_share=-1.0)


# ---------------------------------------------------------------- the objective


def test_dora_objective_matches_numpy():
    rng = np.random.default_rng(1)
    L = rng.uniform(0.1, 2.0, 12)
    h = rng.uniform(0.0, 4.0, 12)
    for lam in (0.1, 1.0, 10.0):
        got = float(dora_objective(jnp.asarray(L, jnp.float32), jnp.asarray(h, jnp.float32), lam=lam))
        assert got == pytest.approx(np_lme(h * L, lam), rel=1e-5)


def test_dora_objective_limits():
    L = jnp.asarray([0.3, 1.7, 0.9, 2.4], jnp.float32)
    # h̃ = 1 and λ -> ∞: the plain mean (float32, no cancellation thanks to the centred form)
    for lam in (1e6, 1e9):
        assert float(dora_objective(L, 1.0, lam=lam)) == pytest.approx(float(L.mean()), rel=1e-6)
    # ... approached as mean + Var/(2λ): kept to float32 precision (a naive λ·(lse(ℓ/λ) − log n)
    # loses every digit of that term here)
    assert float(dora_objective(L, 1.0, lam=1e4)) - float(L.mean()) == pytest.approx(
        np_lme(np.asarray(L), 1e4) - np.mean(np.asarray(L, np.float64)), rel=2e-2)
    # general h̃ and λ -> ∞: the calibrated mean
    h = jnp.asarray([0.5, 2.0, 1.0, 0.1])
    assert float(dora_objective(L, h, lam=1e7)) == pytest.approx(float(jnp.mean(h * L)), rel=1e-5)
    # one example: exactly h̃·ℓ, for every λ
    for lam in (0.01, 1.0, 100.0):
        assert float(dora_objective(jnp.asarray([1.3]), jnp.asarray([2.5]), lam=lam)) == pytest.approx(3.25, rel=1e-6)
    # λ -> 0: the worst calibrated loss
    assert float(dora_objective(L, h, lam=1e-3)) == pytest.approx(float(jnp.max(h * L)), abs=5e-3)
    # huge losses do not overflow
    assert np.isfinite(float(dora_objective(jnp.asarray([1e4, 0.0]), 1.0, lam=1.0)))
    with pytest.raises(ValueError, match="lam"):
        dora_objective(L, 1.0, lam=0.0)


@pytest.mark.parametrize("lam", [0.5, 1.0, 1e5])
def test_dora_gradient_weights_are_softmax(lam):
    rng = np.random.default_rng(2)
    L = rng.uniform(0.1, 3.0, 10)
    h = rng.uniform(0.1, 4.0, 10)
    g = np.asarray(jax.grad(lambda x: dora_objective(x, jnp.asarray(h, jnp.float32), lam=lam))(jnp.asarray(L, jnp.float32)))
    # d/dℓ_i = softmax(h̃ℓ/λ)_i · h̃_i, i.e. the weights on the calibrated losses are softmax(h̃ℓ/λ)
    np.testing.assert_allclose(g, np_softmax(h * L / lam) * h, rtol=1e-4, atol=1e-7)
    ga = np.asarray(jax.grad(lambda a: dora_objective(a, 1.0, lam=lam))(jnp.asarray(h * L, jnp.float32)))
    np.testing.assert_allclose(ga, np_softmax(h * L / lam), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(ga.sum(), 1.0, rtol=1e-5)
    # h̃ is a constant
    gh = jax.grad(lambda hh: dora_objective(jnp.asarray(L, jnp.float32), hh, lam=lam))(jnp.asarray(h, jnp.float32))
    assert np.all(np.asarray(gh) == 0)


def test_log_mean_exp_switches_branches_continuously():
    x = jnp.asarray([0.0, 29.0, -5.0], jnp.float32)
    for lam in (0.5, 1.0, 3.0):
        assert float(log_mean_exp(x, lam)) == pytest.approx(np_lme(np.asarray(x), lam), rel=1e-5)


def test_dora_reduce_over_a_named_axis_equals_global():
    rng = np.random.default_rng(3)
    L = jnp.asarray(rng.uniform(0.1, 2.0, 16), jnp.float32)
    h = jnp.asarray(rng.uniform(0.1, 3.0, 16), jnp.float32)
    glob = float(dora_objective(L, h, lam=0.7))
    split = jax.vmap(lambda l, hh: dora_objective(l, hh, lam=0.7, axis_name="dev"), axis_name="dev")(
        L.reshape(4, 4), h.reshape(4, 4))
    np.testing.assert_allclose(np.asarray(split), glob, rtol=1e-6)
    aux = {"source_prob": jnp.stack([h / 4, h / 5], -1), "source_share": jnp.full((16, 2), 0.6)}
    fn = lambda l, **hp: reduce_losses(WEIGHTING_RULES["dora"], l, **hp)[1]  # noqa: E731 - the logged weights
    w = fn(L, aux=aux, lam=0.7, alpha=0.3)
    ws = jax.vmap(lambda l, p, a: fn(l, aux={"source_prob": p, "source_share": a}, lam=0.7, alpha=0.3,
                                     axis_name="dev"), axis_name="dev")(
        L.reshape(4, 4), aux["source_prob"].reshape(4, 4, 2), aux["source_share"].reshape(4, 4, 2))
    np.testing.assert_allclose(np.asarray(ws).reshape(-1), np.asarray(w), rtol=1e-6)


# ---------------------------------------------------------------- composition with every base loss


def _inputs(rng, B=6, K=2):
    pc, pr = rng.normal(-10, 2, B), rng.normal(-11, 2, B)
    d = {
        "policy_chosen_logps": pc, "policy_rejected_logps": pr,
        "reference_chosen_logps": pc + rng.normal(0, 1, B), "reference_rejected_logps": pr + rng.normal(0, 1, B),
        "chosen_n_tokens": rng.integers(2, 9, B).astype(float), "rejected_n_tokens": rng.integers(2, 9, B).astype(float),
        "policy_kl_logps": rng.normal(-10, 2, B), "reference_kl_logps": rng.normal(-10, 2, B),
        "source_prob": rng.uniform(0.05, 0.95, (B, K)), "source_share": rng.choice([0.25, 0.75], (B, K)),
    }
    return {k: jnp.asarray(v, jnp.float32) for k, v in d.items()}


@pytest.mark.parametrize("base", sorted(BASE_LOSSES))
@pytest.mark.parametrize("rule", ["dora", "dro", "dora_reweight"])
def test_dora_rules_compose_with_every_base_loss(base, rule):
    """By config: make_objective(base, rule) equals the rule applied to that base's per-example losses."""
    inputs = _inputs(np.random.default_rng(4))
    kw = {"dora": {"lam": 0.8, "alpha": 0.25}, "dro": {"lam": 0.8}, "dora_reweight": {"alpha": 0.25}}[rule]
    obj = make_objective(base, rule, weighting_kwargs=kw)
    loss, metrics = obj(inputs)
    L = np.asarray(obj.terms(inputs)[0].losses, np.float64)
    H = np_h(np.asarray(inputs["source_prob"]), 0.25, np.asarray(inputs["source_share"])).mean(-1)
    want = {"dora": lambda: np_lme(H * L, 0.8), "dro": lambda: np_lme(L, 0.8), "dora_reweight": lambda: np.mean(H * L)}
    assert float(loss) == pytest.approx(want[rule](), rel=1e-5, abs=1e-6)
    assert np.isfinite(float(metrics["weights/ess"]))
    if base in ("dpo", "pl"):
        g = jax.grad(lambda x: obj({**inputs, "policy_chosen_logps": x})[0])(inputs["policy_chosen_logps"])
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)
    if rule == "dora":  # logged weights = n·softmax(Hℓ/λ)·H, the gradient weights in mean form
        w = len(L) * np_softmax(H * L / 0.8) * H
        assert float(metrics["weights/max"]) == pytest.approx(w.max(), rel=1e-4)


def test_dora_config_method_validates_and_missing_source_is_a_clear_error():
    from alignshift.config import ConfigError, load_config

    cfg = load_config(None, ["methods=[{name: d, base: pl, weighting: dora, weighting_kwargs: {lam: 1.0, alpha: 0.2}}]"])
    assert cfg.methods[0].weighting == "dora"
    with pytest.raises(ConfigError, match="unknown hyper-parameter"):
        load_config(None, ["methods=[{name: d, base: dpo, weighting: dora, weighting_kwargs: {tau: 1.0}}]"])
    inputs = _inputs(np.random.default_rng(5))
    del inputs["source_prob"]
    with pytest.raises(ValueError, match="'source_prob' and 'source_share'"):
        make_objective("dpo", "dora")(inputs)
    assert "source" in make_objective("dpo", "dora").requires and "source" not in make_objective("dpo", "dro").requires


def test_dora_authors_code_forms():
    rng = np.random.default_rng(6)
    inputs = _inputs(rng, B=5, K=4)
    inputs.update(policy_logps=jnp.asarray(rng.normal(-10, 2, (5, 4)), jnp.float32),
                  reference_logps=jnp.asarray(rng.normal(-10, 2, (5, 4)), jnp.float32),
                  n_tokens=jnp.full((5, 4), 4.0), scores=jnp.asarray(rng.normal(size=(5, 4)), jnp.float32))
    h = np_h(np.asarray(inputs["source_prob"]), 0.25, np.asarray(inputs["source_share"]))
    for base in ("lire", "rrhf", "pl"):
        L = np.asarray(make_objective(base).terms(inputs)[0].losses, np.float64)
        lire_code = float(make_objective(base, "dora", weighting_kwargs={"form": "lire_code"})(inputs)[0])
        assert lire_code == pytest.approx(h.mean() * np_lme(L, 1.0), rel=1e-5)
        rrhf_code = float(make_objective(base, "dora", weighting_kwargs={"form": "rrhf_code"})(inputs)[0])
        assert rrhf_code == pytest.approx(np_lme(h.ravel() * L.mean(), 1.0), rel=1e-5)
        spec = float(make_objective(base, "dora")(inputs)[0])
        assert spec == pytest.approx(np_lme(h.mean(-1) * L, 1.0), rel=1e-5)
    with pytest.raises(ValueError, match="unknown DoRA form"):
        make_objective("pl", "dora", weighting_kwargs={"form": "x"})(inputs)


# ---------------------------------------------------------------- the source classifier


def _np_ece(p, y, n_bins):
    """An independent ECE: np.digitize bin edges, then the weighted |mean p − mean y|."""
    edges = np.linspace(0, 1, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    return sum(np.mean(idx == b) * abs(p[idx == b].mean() - y[idx == b].mean()) for b in range(n_bins) if np.any(idx == b))


def test_calibration_report_fields_match_numpy():
    from alignshift.rewards.source_classifier import calibration_report

    rng = np.random.default_rng(7)
    p = rng.uniform(0, 1, 500)
    p[:3] = [0.0, 1.0, 0.5]
    y = (rng.uniform(0, 1, 500) < p ** 1.5).astype(float)
    r = calibration_report(p, y, n_bins=10)
    assert r["n"] == 500 and r["base_rate"] == pytest.approx(y.mean())
    assert r["accuracy"] == pytest.approx(np.mean((p > 0.5) == y))
    assert r["ece"] == pytest.approx(_np_ece(p, y, 10), rel=1e-9)
    conf, hit = np.maximum(p, 1 - p), ((p > 0.5) == y).astype(float)
    assert r["ece_confidence"] == pytest.approx(_np_ece(conf, hit, 10), rel=1e-9)
    assert r["brier"] == pytest.approx(np.mean((p - y) ** 2))
    pos, neg = p[y == 1], p[y == 0]
    auc = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert r["auc"] == pytest.approx(auc, rel=1e-9)
    assert sum(b["count"] for b in r["bins"]) == 500 and r["bins"][-1]["count"] == np.sum(p >= 0.9)
    # a perfectly calibrated predictor has a small ECE; a miscalibrated one a large ECE
    assert calibration_report(np.full(4000, 0.3), (rng.uniform(size=4000) < 0.3).astype(float))["ece"] < 0.03
    assert calibration_report(np.full(100, 0.9), np.zeros(100))["ece"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="probabilities"):
        calibration_report([0.2, 1.3], [0, 1])
    with pytest.raises(ValueError, match="same length"):
        calibration_report([0.2, 0.3], [0, 1, 1])


def test_source_classifier_beats_chance_and_recovers_the_density_ratio(tmp_path):
    """Gaussian sources in 1-D (+ noise dims): per-source logistic regression is well specified,
    so h̃ must track the true dQ0/dP; a reliability plot is written atomically."""
    from scipy.stats import norm

    from alignshift.rewards.source_classifier import ClassifierConfig, SourceClassifier, attach_source_probs, \
        plot_reliability

    rng = np.random.default_rng(8)
    mix = {"target": 0.3, "s1": 0.4, "s2": 0.3}
    means = {"target": 0.0, "s1": 2.0, "s2": -2.0}
    src = rng.choice(list(mix), size=2000, p=list(mix.values()))
    x = np.stack([rng.normal([means[s] for s in src], 1.0), rng.normal(size=2000)], 1).astype(np.float32)
    clf = SourceClassifier(mode="per_source", config=ClassifierConfig(steps=200)).fit(x, src, mixture=mix, seed=0)
    for name, rep in clf.reports.items():
        # Bayes AUC of N(0,1) vs N(±2,1) is Φ(√2) ≈ 0.92; chance is 0.5
        assert rep["accuracy"] > 0.75 and rep["auc"] > 0.85 and rep["ece"] < 0.1, (name, rep)
    p, a = clf.predict(x)
    h = np.asarray(dora_calibration(p, alpha=0.3, source_share=a))
    q = {s: norm.pdf(x[:, 0], means[s]) for s in mix}
    true = q["target"] / sum(mix[s] * q[s] for s in mix)
    assert np.corrcoef(h, true)[0, 1] > 0.97
    assert np.median(np.abs(h - true) / true) < 0.15
    assert h.max() <= 1 / 0.3 + 1e-5
    # pooled: target N(0,1) vs the bimodal N(±2,1) mixture: not linearly separable; the MLP option
    pooled = SourceClassifier(mode="pooled", config=ClassifierConfig(hidden=8, steps=200)).fit(x, src, mixture=mix)
    assert pooled.reports["pooled"]["auc"] > 0.7  # chance: 0.5
    path = tmp_path / "rel.png"
    plot_reliability(clf.reports, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and os.listdir(tmp_path) == ["rel.png"]
    json.dumps(clf.summary())  # JSON-ready
    arr = attach_source_probs({"x": 1}, p[:1998], a[:1998], k=3)
    assert arr["source_prob"].shape == (666, 3) and arr["x"] == 1
    with pytest.raises(ValueError, match="multiple of k"):
        attach_source_probs({}, p[:-1], a[:-1], k=3)
    with pytest.raises(ValueError, match="not in the mixture"):
        SourceClassifier().fit(x, np.where(src == "s2", "s3", src), mixture=mix)


def test_reference_features_are_masked_mean_of_hidden_states():
    from flax import nnx

    from alignshift.models.llama import LlamaConfig, LlamaForCausalLM
    from alignshift.rewards.source_classifier import reference_features
    from alignshift.forward import split_model

    model = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1), rngs=nnx.Rngs(0))
    graphdef, params, rest = split_model(model)
    rng = np.random.default_rng(9)
    ids = rng.integers(4, 20, (5, 7)).astype(np.int32)
    am = np.ones((5, 7), np.int32)
    am[:, 6] = 0
    lm = np.zeros((5, 7), np.int32)
    lm[:, 3:6] = 1
    f = reference_features(graphdef, rest, params, {"input_ids": ids, "attention_mask": am, "loss_mask": lm},
                           batch_size=4)
    h = np.asarray(model.hidden_states(jnp.asarray(ids), attention_mask=jnp.asarray(am)))
    np.testing.assert_allclose(f, h[:, 3:6].mean(1), rtol=1e-5, atol=1e-6)
    fa = reference_features(graphdef, rest, params, {"input_ids": ids, "attention_mask": am, "loss_mask": lm},
                            pool="all")
    np.testing.assert_allclose(fa, h[:, :6].mean(1), rtol=1e-5, atol=1e-6)


def test_dora_paired_comparisons_have_t_intervals():
    """DoRA minus each ablation, paired by seed: mean, s.e., 95% Student-t interval (scipy) and the
    count of seeds where DoRA is higher; the table prints the interval."""
    from scipy import stats

    from alignshift.config import MethodConfig
    from alignshift.experiment.dora import format_paired, paired_comparisons

    methods = [MethodConfig(name="dpo", base="dpo"), MethodConfig(name="dro", base="dpo", weighting="dro"),
               MethodConfig(name="dora", base="dpo", weighting="dora")]
    acc = {"dpo": [0.80, 0.79, 0.82, 0.81], "dro": [0.81, 0.80, 0.80, 0.82], "dora": [0.83, 0.785, 0.84, 0.815]}
    summaries = [{"seed": s, "methods": {m: {"target_pref_acc": acc[m][s], "target_pref_acc_flat": acc[m][s] - 0.05,
                                              "target_reward": 1.0 + acc[m][s]} for m in acc}} for s in range(4)]
    out = paired_comparisons(summaries, methods)
    assert list(out) == ["dora - dpo", "dora - dro"]
    d = np.asarray(acc["dora"], np.float64) - np.asarray(acc["dpo"], np.float64)
    half = stats.t.ppf(0.975, 3) * d.std(ddof=1) / np.sqrt(4)
    r = out["dora - dpo"]
    assert r["target_pref_acc"] == pytest.approx(d.mean())
    assert r["target_pref_acc_ci95"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert r["target_pref_acc_n_positive"] == 3
    assert f"[{d.mean() - half:+.4f}, {d.mean() + half:+.4f}]" in format_paired(out, 4)
    one = paired_comparisons(summaries[:1], methods)["dora - dpo"]
    assert one["target_pref_acc_ci95"] is None and "[" not in format_paired({"x": one}, 1).splitlines()[-1]
