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

from alignshift.config import load_config
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


# ------------------------------------------------------------------ 2. the KLDPO LLM schedule and batches

def _hf_cosine_with_min_lr(step, lr, warmup, total, min_ratio):
    """HF ``get_cosine_with_min_lr_schedule_with_warmup`` (OpenRLHF's schedule), float64."""
    if step < warmup:
        return lr * step / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    factor = 0.5 * (1.0 + np.cos(np.pi * progress))
    return lr * (factor * (1.0 - min_ratio) + min_ratio)


def test_kldpo_llm_schedule_is_the_papers():
    """kldpo_helpsteer2_llama32_1b.yaml: 8 epochs (632 steps), 10% warm-up (ceil(63.2) = 64
    steps), cosine down to 0.1·lr, lr 5e-7, β 0.01, effective batch 128."""
    from alignshift.train.optim import make_schedule, warmup_length

    cfg = load_config(os.path.join(ROOT, "experiments", "configs", "kldpo_helpsteer2_llama32_1b.yaml"))
    o = cfg.train.optim
    assert (o.lr, o.warmup_ratio, o.min_lr_ratio, o.schedule_steps) == (5e-7, 0.1, 0.1, 632)
    assert cfg.train.steps == 632 and cfg.train.batch_size == 128
    assert {m.base_kwargs["beta"] for m in cfg.methods} == {0.01}
    assert warmup_length(o, cfg.train.steps) == 64
    sched = make_schedule(o, cfg.train.steps)
    assert float(sched(0)) == 0.0
    assert float(sched(64)) == pytest.approx(5e-7, rel=1e-6)  # end of the warm-up: the peak
    assert float(sched(632)) == pytest.approx(5e-8, rel=1e-6)  # the end: 0.1·lr
    steps = np.arange(0, 633, 7)
    ours = np.asarray([float(sched(int(s))) for s in steps])
    ref = np.asarray([_hf_cosine_with_min_lr(s, 5e-7, 64, 632, 0.1) for s in steps])
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-14)
    # stopping at the authors' step-316 checkpoint keeps the 8-epoch schedule
    short = make_schedule(o, 316)
    assert float(short(200)) == pytest.approx(float(sched(200)), rel=1e-7)
    # the former schedule (12 warm-up steps, cosine to 0 over 158) gave 36% less learning rate by step 158
    old = make_schedule(load_config(None, ["train.optim.lr=5e-7", "train.optim.warmup_steps=12"]).train.optim, 158)
    cum_old = sum(float(old(s)) for s in range(158))
    cum_new = sum(float(sched(s)) for s in range(158))
    assert 1 - cum_old / cum_new == pytest.approx(0.361, abs=0.002)


def test_default_schedule_is_unchanged():
    """warmup_ratio = min_lr_ratio = schedule_steps = 0 (the defaults): today's schedule, bit for bit."""
    import optax

    from alignshift.config import OptimConfig
    from alignshift.train.optim import make_schedule

    for total, warmup in ((150, 10), (20, 10), (5, 10)):
        o = OptimConfig(lr=1e-4, warmup_steps=warmup)
        w = min(warmup, total - 1)
        old = optax.warmup_cosine_decay_schedule(init_value=0.0, peak_value=1e-4, warmup_steps=w,
                                                 decay_steps=max(total, w + 1), end_value=0.0)
        new = make_schedule(o, total)
        assert all(float(new(s)) == float(old(s)) for s in range(total + 1))


@pytest.mark.parametrize("overrides, match", [
    (["train.optim.warmup_ratio=0.1", "train.optim.warmup_steps=5"], r"'train.optim.warmup_steps' and "
                                                                      r"'train.optim.warmup_ratio' are both set"),
    (["train.optim.warmup_ratio=1.0"], r"'train.optim.warmup_ratio' must be in \[0, 1\)"),
    (["train.optim.warmup_ratio=nan"], r"'train.optim.warmup_ratio' must be in \[0, 1\)"),
    (["train.optim.min_lr_ratio=-0.1"], r"'train.optim.min_lr_ratio' must be in \[0, 1\]"),
    (["sft.optim.min_lr_ratio=1.5"], r"'sft.optim.min_lr_ratio' must be in \[0, 1\]"),
    (["train.optim.schedule_steps=-1"], r"'train.optim.schedule_steps' must be >= 0"),
])
def test_schedule_keys_are_validated(overrides, match):
    from alignshift.config import ConfigError

    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


# (config, effective batch, grad_accum_steps): the papers' / authors' global batch and micro-batches
PAPER_BATCHES = {
    "kldpo_helpsteer2_llama32_1b": (128, 4),  # 8 GPUs x 4 x 4 accumulation (train_alignment.sh)
    "dora_hh_mistral": (32, 8),               # 4 GPUs x 1 x 8 accumulation (train_mistral_hh.sh)
    "flr_ultrafeedback_llama3_8b": (8, 8),    # [INFER] LLaMA-Factory's DPO example, 1 x 8
    "iw_dpo_safe_rlhf_llama3_8b": (64, 1),    # [INFER] not in the sources
    "iw_dpo_shp_pythia_1.4b": (64, 1),        # [INFER] not in the sources
}


def test_warmup_ratio_with_warmup_steps_zero_is_accepted():
    cfg = load_config(None, ["train.optim.warmup_steps=0", "train.optim.warmup_ratio=0.1", "train.steps=50"])
    from alignshift.train.optim import warmup_length

    assert warmup_length(cfg.train.optim, cfg.train.steps) == 5


def test_per_paper_configs_use_the_papers_effective_batch():
    paper = [p for p in CONFIGS if any(k in _name(p) for k in ("_llama", "_pythia", "_mistral"))]
    assert {_name(p) for p in paper} == set(PAPER_BATCHES)
    for p in paper:
        cfg = load_config(p)
        batch, accum = PAPER_BATCHES[_name(p)]
        assert (cfg.train.batch_size, cfg.train.grad_accum_steps) == (batch, accum), _name(p)


# ------------------------------------------------------------------ 3. DoRA's pairwise weight on K = 4 data

def _np_h(p, a, alpha):
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1.0)
    return p / (alpha * p + np.asarray(a, np.float64) * (1.0 - p))


@pytest.mark.parametrize("pair_weight", ["candidates", "pair"])
def test_dora_pair_weight_definitions_match_numpy(pair_weight):
    """H of a best-vs-worst pair of K = 4 candidates: the mean of h over all four (the authors'
    code, default) or over the pair's own two; the same function selects the columns for
    experiments/dora.py and preference_hf.py (dora_hh_mistral.yaml)."""
    from alignshift.losses.dora import pair_weight_columns

    rng = np.random.default_rng(3)
    n, k, alpha = 8, 4, 0.25
    prob = rng.uniform(0.05, 0.95, size=(n, k)).astype(np.float32)
    share = np.full((n, k), 0.25, np.float32)
    cols = np.stack([rng.permutation(k)[:2] for _ in range(n)])
    p2, a2 = pair_weight_columns(prob, share, cols, pair_weight)
    inp = {**_dpo_inputs(rng, n), "source_prob": jnp.asarray(p2), "source_share": jnp.asarray(a2)}
    obj = make_objective("dpo", "dora_reweight", base_kwargs={"beta": 0.5},
                         weighting_kwargs={"alpha": alpha, "pair_weight": pair_weight})
    loss, _ = obj(inp)
    h = _np_h(prob, share, alpha)
    H = h.mean(1) if pair_weight == "candidates" else np.take_along_axis(h, cols, 1).mean(1)
    ref = np.mean(H * _np_dpo_losses({k_: v for k_, v in inp.items() if not k_.startswith("source")}, 0.5))
    assert float(loss) == pytest.approx(ref, rel=1e-5)
    assert p2.shape == ((n, 4) if pair_weight == "candidates" else (n, 2))


def test_dora_pair_weight_is_validated():
    from alignshift.losses.hparams import HParamError

    with pytest.raises(HParamError, match=r"'pair_weight' must be one of \['candidates', 'pair'\]; got 'both'"):
        make_objective("dpo", "dora", weighting_kwargs={"pair_weight": "both"})
    from alignshift.config import ConfigError

    with pytest.raises(ConfigError, match=r"'methods.0.weighting_kwargs.pair_weight' must be one of"):
        load_config(None, ["methods.0.weighting=dora_reweight", "methods.0.weighting_kwargs.pair_weight=x"])
    # 'pair' given all K candidates of a pairwise batch: an error, not a silent average over four
    rng = np.random.default_rng(0)
    inp = {**_dpo_inputs(rng, 4), "source_prob": jnp.full((4, 4), 0.5), "source_share": jnp.full((4, 4), 0.25)}
    with pytest.raises(ValueError, match="pair's own two responses"):
        make_objective("dpo", "dora", weighting_kwargs={"pair_weight": "pair"})(inp)


def test_dora_experiment_selects_columns_by_pair_weight():
    """experiments/dora.py's method_run: all K candidate columns by default, the pair's two with
    pair_weight: pair; listwise methods keep the list's K."""
    import types

    from alignshift.config import MethodConfig
    from alignshift.experiment.dora import DoraExperiment

    n, k = 6, 4
    prob = np.tile(np.arange(k, dtype=np.float32) / 10 + 0.1, (n, 1))
    pairs = {"chosen_input_ids": np.zeros((n, 3), np.int32), "source_prob": prob, "source_share": prob * 0 + 0.25}
    cols = np.tile([[3, 1]], (n, 1))
    ctx = types.SimpleNamespace(sets={"pairs": pairs, "lists": dict(pairs)}, extra={"pair_cols": cols},
                                data=types.SimpleNamespace(alpha=0.2), cfg=None)
    exp = DoraExperiment()
    default = exp.method_run(ctx, MethodConfig(name="d", base="dpo", weighting="dora"))
    assert default.arrays["source_prob"].shape == (n, k)
    pair = exp.method_run(ctx, MethodConfig(name="p", base="dpo", weighting="dora",
                                            weighting_kwargs={"pair_weight": "pair"}))
    np.testing.assert_allclose(pair.arrays["source_prob"][0], [0.4, 0.2], rtol=1e-6)
    assert pair.method.weighting_kwargs["alpha"] == 0.2
    listwise = exp.method_run(ctx, MethodConfig(name="l", base="pl", weighting="dora",
                                                weighting_kwargs={"pair_weight": "pair"}))
    assert listwise.arrays["source_prob"].shape == (n, k)


# ------------------------------------------------------------------ 4. SimPO's published configurations

def _np_simpo(c, r, beta, gamma):
    return np.logaddexp(0.0, -(beta * (np.asarray(c, np.float64) - np.asarray(r, np.float64)) - gamma))


@pytest.mark.parametrize("kwargs, beta, gamma", [
    ({}, 2.0, 1.6),                                          # default = Mistral-base: β 2.0, γ 1.6
    ({"preset": "mistral_base"}, 2.0, 1.6),
    ({"preset": "llama3_instruct"}, 2.5, 0.55 * 2.5),        # Llama-3-Instruct: β 2.5, γ/β 0.55
    ({"preset": "llama3_instruct", "beta": 2.0}, 2.0, 1.1),  # the preset's ratio follows an explicit β
    ({"preset": "mistral_base", "gamma_beta_ratio": 0.55}, 2.0, 1.1),  # the former defaults
    ({"beta": 3.0, "gamma": 0.5, "gamma_beta_ratio": 0.55}, 3.0, 0.5),  # an explicit γ wins
])
def test_simpo_presets_match_numpy(kwargs, beta, gamma):
    from alignshift.losses.preference import simpo_hparams

    assert simpo_hparams(**kwargs) == pytest.approx((beta, gamma))
    rng = np.random.default_rng(4)
    n = 8
    c, r = rng.normal(-8, 2, n), rng.normal(-8, 2, n)
    nt = np.full(n, 4.0)
    inp = {"policy_chosen_logps": jnp.asarray(c, jnp.float32), "policy_rejected_logps": jnp.asarray(r, jnp.float32),
           "chosen_n_tokens": jnp.asarray(nt, jnp.float32), "rejected_n_tokens": jnp.asarray(nt, jnp.float32)}
    terms, _ = make_objective("simpo", base_kwargs=kwargs).terms(inp)
    np.testing.assert_allclose(np.asarray(terms.losses), _np_simpo(c / 4, r / 4, beta, gamma), rtol=1e-5)


def test_simpo_preset_is_validated():
    from alignshift.config import ConfigError

    with pytest.raises(ConfigError, match=r"'methods.0.base_kwargs.preset' must be one of "
                                          r"\['mistral_base', 'llama3_instruct'\]; got 'zephyr'"):
        load_config(None, ["methods.0.base=simpo", "methods.0.base_kwargs.preset=zephyr",
                           "train.precompute_reference=false"])
    cfg = load_config(os.path.join(ROOT, "experiments", "configs", "shift_demo.yaml"))
    (simpo,) = [m for m in cfg.methods if m.base == "simpo"]
    assert simpo.base_kwargs == {"preset": "mistral_base"}


# ------------------------------------------------------------------ 5. KTO's reference point (kl_* rows)

def _trl_kl_sources(n, per_device_batch):
    """TRL's KL completions for a paired data set, as (prompt row, completion row, field):
    maybe_unpair_preference_dataset -> [every chosen ..., every rejected ...] (one map chunk),
    then _get_kl_dataset rotates completions by one within each per-device batch."""
    rows = [(i, i, "chosen") for i in range(n)] + [(i, i, "rejected") for i in range(n)]
    out = []
    for s in range(0, len(rows), per_device_batch):
        chunk = rows[s:s + per_device_batch]
        rotated = [chunk[-1]] + chunk[:-1]
        out += [(p[0], c[1], c[2]) for p, c in zip(chunk, rotated)]
    return out


def test_kto_kl_completions_follow_trl():
    """Default kl_pairing="trl": every kl_* row pairs its prompt with ANOTHER example's
    completion, half of them chosen and half rejected, as TRL's KL completions (all of a
    batch's completions, rejected ones included); "previous_chosen" is the former rule."""
    from alignshift.data.encode import kl_completion_sources

    n = 10
    src = kl_completion_sources(n)
    assert all(j != i for i, (j, _) in enumerate(src))
    assert sum(f == "rejected" for _, f in src) == n // 2 == sum(f == "chosen" for _, f in src)
    trl = _trl_kl_sources(n, per_device_batch=4)
    assert sum(f == "rejected" for _, _, f in trl) == n == sum(f == "chosen" for _, _, f in trl)
    assert sum(p != c for p, c, _ in trl) >= 2 * n - 4  # mismatched but for chunk edges of one pair's rows
    assert kl_completion_sources(n, "previous_chosen") == [((i - 1) % n, "chosen") for i in range(n)]
    assert kl_completion_sources(1) == [(0, "chosen")]
    with pytest.raises(ValueError, match="unknown kl_pairing 'x'"):
        kl_completion_sources(3, "x")


def test_encode_pairs_kl_rows_by_default_are_trls():
    from alignshift.data import encode_pairs
    from alignshift.data.schema import PreferenceExample
    from alignshift.data.tokenizer import WordTokenizer

    texts = [("recipe oven", "poison"), ("flour", "the a"), ("oven oven", "a"), ("bake", "no")]
    exs = [PreferenceExample(f"user: explain {w} assistant:", c, r) for w, (c, r) in zip("abcd", texts)]
    tok = WordTokenizer(sorted({w for e in exs for w in f"{e.prompt} {e.chosen} {e.rejected}".split()}))
    enc = encode_pairs(tok, exs, max_prompt_len=6, max_completion_len=4)
    for i in range(len(exs)):
        j = (i - 1) % len(exs)
        want = exs[j].chosen if i % 2 == 0 else exs[j].rejected
        ids, lm = enc["kl_input_ids"][i], enc["kl_loss_mask"][i]
        assert tok.decode(ids[lm == 1], skip_special=False) == want + " <eos>"
    # the kl row's prompt part is the example's own prompt
    np.testing.assert_array_equal(enc["kl_input_ids"] * (1 - enc["kl_loss_mask"]) * enc["kl_attention_mask"],
                                  enc["chosen_input_ids"] * (1 - enc["chosen_loss_mask"]) * enc["chosen_attention_mask"])
