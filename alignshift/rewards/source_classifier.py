"""DoRA's source classifier: ``Pr(target | prompt, response)`` vs the synthetic sources, with a
held-out calibration report, precomputed once per response (docs/methods.md §4.1–4.2).

Pipeline (:class:`SourceClassifier`):

1. **Features** of each (prompt, response): by default the frozen reference model's final
   hidden states, mean-pooled over the response tokens (:func:`reference_features`);
   optionally any local HF encoder folder, mean-pooled over its tokens
   (:func:`hf_encoder_features`, PyTorch via ``transformers``; nothing is downloaded).
2. **Classifiers**, trained with optax (Adam, full batch, L2) on standardised features, plain
   (un-weighted) binary cross-entropy, so on held-out data from the same mixture the raw
   probability ``c`` is a calibrated posterior:

   * ``mode="pooled"`` (default): one classifier, target vs every synthetic source together;
   * ``mode="per_source"``: one classifier per source ``i``, target vs source ``i`` (the paper).

   ``hidden=0`` is logistic regression; ``hidden > 0`` one tanh hidden layer.
3. **Calibration report** on a held-out split (:func:`calibration_report`): accuracy, ECE,
   Brier score, NLL, base rate and the reliability-diagram bins; the plot is saved
   atomically (:func:`plot_reliability`).
4. **p per response** (:meth:`SourceClassifier.predict`), the input of
   :func:`alignshift.losses.dora.dora_calibration`: the prior-corrected probability whose
   odds estimate the density ratio, ``p/(1−p) = Q₀/Q_s`` (the paper's class-imbalance factor
   γ: ``logit p = logit c − log(n_target/n_source)`` of the classifier's training set), and
   ``a`` = the matching source share, so that

       h̃ = 1 / (α + a·(1 − p)/p)  ≈  dQ₀/dP.

   ``pooled``: ``a = 1 − α`` (the synthetic sources' total share); then ``h̃ = c/α`` exactly,
   with ``c`` the raw posterior in the training mixture. ``per_source``: the paper's
   ``h̃ = 1/(α + Σ_i β_i·Q_i/Q₀)`` summed over ALL sources, returned as an effective ``p``
   with ``a = 1 − α``. (The authors' code keeps only the response's own-source term with
   ``a = β_{source}``; pass those to ``dora_calibration`` directly for that approximation.)

The ``p``/``a`` arrays are stored with the encoded data set as ``source_prob`` /
``source_share`` (``[N, K]``: one column per response of a pair or list), so the training
step only reads them (:func:`attach_source_probs`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from alignshift.forward import map_batches

__all__ = [
    "ClassifierConfig",
    "BinaryClassifier",
    "SourceClassifier",
    "reference_features",
    "hf_encoder_features",
    "calibration_report",
    "plot_reliability",
    "attach_source_probs",
]


# ------------------------------------------------------------------------------ features


def reference_features(graphdef, rest, params, arrays: dict, *, pool: str = "response",
                       batch_size: int = 256) -> np.ndarray:
    """Mean-pooled final hidden states ``[N, d]`` (float32) of the frozen model ``(graphdef,
    params, rest)`` on ``arrays`` = ``{input_ids, attention_mask, loss_mask}`` ``[N, T]`` (the
    :func:`alignshift.data.encode_completions` layout). ``pool="response"`` averages over the
    response tokens (``loss_mask``), ``"all"`` over every attended token (prompt included)."""
    from flax import nnx

    if pool not in ("response", "all"):
        raise ValueError(f"pool must be 'response' or 'all'; got {pool!r}")

    @jax.jit
    def fn(p, ids, am, m):
        h = nnx.merge(graphdef, p, rest).hidden_states(ids, attention_mask=am).astype(jnp.float32)
        w = m.astype(jnp.float32)[..., None]
        return (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)

    ids, am, lm = (np.asarray(arrays[k]) for k in ("input_ids", "attention_mask", "loss_mask"))
    mask = lm if pool == "response" else am
    if not ids.shape[0]:
        return np.zeros((0, 0), np.float32)
    return map_batches(lambda p, b: fn(p, *b), [ids, am, mask], batch_size=batch_size, args=(params,)).astype(np.float32)


def hf_encoder_features(path: str, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int = 64,
                        max_length: int = 128) -> np.ndarray:
    """Mean-pooled last hidden states ``[N, d]`` of a local HF encoder folder (e.g. a BERT
    checkpoint saved with ``save_pretrained``) on ``prompt + " " + response`` text; PyTorch on
    CPU, ``local_files_only`` (nothing is downloaded)."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    texts = [f"{p} {r}" for p, r in zip(prompts, responses)]
    out = []
    with torch.no_grad():
        for a in range(0, len(texts), batch_size):
            enc = tok(texts[a:a + batch_size], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
            h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            out.append(((h * m).sum(1) / m.sum(1).clamp(min=1)).float().numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 0), np.float32)


# ------------------------------------------------------------------------------ classifier


@dataclasses.dataclass
class ClassifierConfig:
    """Training of one binary classifier (optax Adam, full batch)."""

    hidden: int = 0  # 0 = logistic regression; > 0 = one tanh hidden layer of this width
    steps: int = 300
    lr: float = 0.05
    l2: float = 1e-3  # L2 penalty on the weights (not the biases)
    seed: int = 0


class BinaryClassifier:
    """``Pr(y = 1 | x)`` by logistic regression or a one-hidden-layer MLP (pure JAX + optax)."""

    def __init__(self, config: ClassifierConfig | None = None):
        self.config = config or ClassifierConfig()
        self.params = None
        self.mean = self.std = None
        self.loss_history: list[float] = []

    @staticmethod
    def _logits(params, x):
        if "w1" in params:
            x = jnp.tanh(x @ params["w1"] + params["b1"])
        return (x @ params["w"] + params["b"])[:, 0]

    def fit(self, x: np.ndarray, y: np.ndarray) -> "BinaryClassifier":
        x, y = np.asarray(x, np.float32), np.asarray(y)
        if x.ndim != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"features must be [N, d] with N = len(labels); got {x.shape} and {y.shape}")
        if not set(np.unique(y).tolist()) <= {0, 1} or len(np.unique(y)) < 2:
            raise ValueError("labels must be 0/1 and contain both classes")
        if not np.all(np.isfinite(x)):
            raise ValueError("features contain non-finite values")
        c = self.config
        self.mean, self.std = x.mean(0), x.std(0) + 1e-6
        xs = jnp.asarray((x - self.mean) / self.std)
        yj = jnp.asarray(y, jnp.float32)
        key = jax.random.PRNGKey(c.seed)
        d = x.shape[1]
        if c.hidden > 0:
            k1, k2 = jax.random.split(key)
            params = {"w1": jax.random.normal(k1, (d, c.hidden)) / math.sqrt(d), "b1": jnp.zeros(c.hidden),
                      "w": jax.random.normal(k2, (c.hidden, 1)) / math.sqrt(c.hidden), "b": jnp.zeros(1)}
        else:
            params = {"w": jnp.zeros((d, 1)), "b": jnp.zeros(1)}
        tx = optax.adam(c.lr)

        def loss_fn(p):
            z = self._logits(p, xs)
            bce = jnp.mean(jax.nn.softplus(z) - yj * z)  # −[y log σ(z) + (1−y) log(1−σ(z))]
            return bce + c.l2 * sum(jnp.sum(v ** 2) for k, v in p.items() if k.startswith("w"))

        @jax.jit
        def run(params):
            def body(carry, _):
                p, s = carry
                loss, g = jax.value_and_grad(loss_fn)(p)
                u, s = tx.update(g, s, p)
                return (optax.apply_updates(p, u), s), loss

            (p, _), losses = jax.lax.scan(body, (params, tx.init(params)), None, length=c.steps)
            return p, losses

        self.params, losses = run(params)
        self.loss_history = [float(v) for v in np.asarray(losses)]
        return self

    def logits(self, x: np.ndarray) -> np.ndarray:
        if self.params is None:
            raise RuntimeError("classifier is not fitted")
        xs = (np.asarray(x, np.float32) - self.mean) / self.std
        return np.asarray(self._logits(self.params, jnp.asarray(xs)), np.float64)

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        z = self.logits(x)
        return 1.0 / (1.0 + np.exp(-z))


# ------------------------------------------------------------------------------ calibration


def calibration_report(p, y, *, n_bins: int = 10) -> dict:
    """Held-out calibration of probabilities ``p`` of the positive class (``y = 1``).

    * ``accuracy``: ``mean((p > 0.5) == y)``;
    * ``ece``: ``Σ_b (n_b/N)·|mean_b(p) − mean_b(y)|`` over ``n_bins`` equal-width bins of
      ``p`` on [0, 1] (``p = 1`` falls in the last bin): the calibration of ``p`` itself, which
      is what the density ratio needs;
    * ``ece_confidence``: the same on the top-label confidence ``max(p, 1−p)`` vs correctness;
    * ``brier``: ``mean((p − y)²)``; ``nll``: mean binary cross-entropy (p clipped to 1e-7);
    * ``auc``: ROC AUC (probability that a random positive outranks a random negative, ties ½;
      NaN with one class only) — accuracy alone is uninformative at a skewed base rate;
    * ``base_rate``: ``mean(y)``; ``n``; ``bins``: per bin ``lo, hi, count, mean_p, frac_pos``.
    """
    p, y = np.asarray(p, np.float64).reshape(-1), np.asarray(y, np.float64).reshape(-1)
    if p.shape != y.shape or p.size == 0:
        raise ValueError(f"p and y must be non-empty and the same length; got {p.shape} and {y.shape}")
    if np.any(~np.isfinite(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError("p must be probabilities in [0, 1]")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int; got {n_bins!r}")

    def ece_of(conf, hit):
        idx = np.minimum((conf * n_bins).astype(int), n_bins - 1)
        total, rows = 0.0, []
        for b in range(n_bins):
            m = idx == b
            cnt = int(m.sum())
            mp = float(conf[m].mean()) if cnt else float("nan")
            fp = float(hit[m].mean()) if cnt else float("nan")
            if cnt:
                total += cnt / len(conf) * abs(mp - fp)
            rows.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "count": cnt, "mean_p": mp, "frac_pos": fp})
        return total, rows

    ece, bins = ece_of(p, y)
    pred = (p > 0.5).astype(np.float64)
    ece_conf, _ = ece_of(np.maximum(p, 1 - p), (pred == y).astype(np.float64))
    pc = np.clip(p, 1e-7, 1 - 1e-7)
    pos, neg = p[y == 1], p[y == 0]
    if len(pos) and len(neg):
        from scipy.stats import rankdata

        ranks = rankdata(np.concatenate([pos, neg]))  # average ranks: ties count ½
        auc = float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))
    else:
        auc = float("nan")
    return {
        "n": int(p.size),
        "accuracy": float(np.mean(pred == y)),
        "ece": float(ece),
        "ece_confidence": float(ece_conf),
        "auc": auc,
        "brier": float(np.mean((p - y) ** 2)),
        "nll": float(-np.mean(y * np.log(pc) + (1 - y) * np.log(1 - pc))),
        "base_rate": float(np.mean(y)),
        "n_bins": n_bins,
        "bins": bins,
    }


def plot_reliability(reports: dict, path: str) -> None:
    """Reliability diagram(s): per bin, mean predicted ``p`` vs observed frequency of the
    positive class, one line per report (``{name: calibration_report(...)}``), saved atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from alignshift.eval.report import save_figure_atomic

    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    ax.plot([0, 1], [0, 1], "k:", lw=0.8, label="perfect calibration")
    for name, r in reports.items():
        xs = [b["mean_p"] for b in r["bins"] if b["count"]]
        ys = [b["frac_pos"] for b in r["bins"] if b["count"]]
        ax.plot(xs, ys, marker="o", ms=3, label=f"{name} (acc {r['accuracy']:.2f}, ECE {r['ece']:.3f})")
    ax.set_xlabel("predicted Pr(target)")
    ax.set_ylabel("observed frequency of target")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, path)


# ------------------------------------------------------------------------------ DoRA's classifier


class SourceClassifier:
    """Target-vs-source classifier(s) for DoRA; see the module docstring.

    ``fit(features, sources, mixture=...)`` with ``sources[i]`` the coarse source label of
    response ``i`` (``target`` names the target distribution) and ``mixture`` the training
    shares ``{source: share}`` (α = ``mixture[target]``). A random ``holdout`` fraction is kept
    out of training for ``reports`` (one per classifier). ``predict(features)`` returns
    ``(p, a)`` per response for :func:`alignshift.losses.dora.dora_calibration`.
    """

    def __init__(self, *, mode: str = "pooled", target: str = "target", holdout: float = 0.2,
                 config: ClassifierConfig | None = None, n_bins: int = 10):
        if mode not in ("pooled", "per_source"):
            raise ValueError(f"mode must be 'pooled' or 'per_source'; got {mode!r}")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be in (0, 1); got {holdout}")
        self.mode, self.target, self.holdout, self.n_bins = mode, target, float(holdout), n_bins
        self.config = config or ClassifierConfig()
        self.classifiers: dict[str, BinaryClassifier] = {}
        self.log_prior_ratio: dict[str, float] = {}
        self.reports: dict[str, dict] = {}
        self.mixture: dict[str, float] = {}

    def fit(self, features: np.ndarray, sources: Sequence[str], *, mixture: dict, seed: int = 0) -> "SourceClassifier":
        x = np.asarray(features, np.float32)
        src = np.asarray(list(sources))
        if x.ndim != 2 or x.shape[0] != src.shape[0]:
            raise ValueError(f"features must be [N, d] with one source label per row; got {x.shape}, {src.shape}")
        mixture = {str(k): float(v) for k, v in mixture.items()}
        unknown = sorted(set(src.tolist()) - set(mixture))
        if unknown:
            raise ValueError(f"source labels {unknown} are not in the mixture {sorted(mixture)}")
        if self.target not in mixture or not 0 < mixture[self.target] < 1:
            raise ValueError(f"mixture needs the target {self.target!r} with a share in (0, 1); got {mixture}")
        if not np.any(src == self.target):
            raise ValueError(f"no response carries the target label {self.target!r}")
        self.mixture = mixture
        rng = np.random.default_rng([int(seed), 4242])
        is_test = rng.random(len(src)) < self.holdout
        groups = ({"pooled": [s for s in mixture if s != self.target]} if self.mode == "pooled"
                  else {s: [s] for s in mixture if s != self.target and mixture[s] > 0})
        for name, negs in groups.items():
            use = (src == self.target) | np.isin(src, negs)
            y = (src == self.target).astype(np.int32)
            tr, te = use & ~is_test, use & is_test
            if len(np.unique(y[tr])) < 2 or len(np.unique(y[te])) < 2:
                raise ValueError(f"classifier {name!r}: both classes are needed in the training and held-out splits")
            clf = BinaryClassifier(dataclasses.replace(self.config, seed=self.config.seed + int(seed)))
            clf.fit(x[tr], y[tr])
            self.classifiers[name] = clf
            # γ: the training set's class ratio, removed from the odds so that p/(1−p) = Q0/Q_s
            self.log_prior_ratio[name] = float(np.log(y[tr].mean() / (1 - y[tr].mean())))
            self.reports[name] = {**calibration_report(clf.predict_proba(x[te]), y[te], n_bins=self.n_bins),
                                  "n_train": int(tr.sum()), "negatives": negs}
        return self

    def density_odds(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Per classifier, the estimated density ratio ``Q₀/Q_s`` of each response."""
        return {name: np.exp(clf.logits(features) - self.log_prior_ratio[name])
                for name, clf in self.classifiers.items()}

    def predict(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(p, a)`` per response (float32): ``dora_calibration(p, alpha=α, source_share=a)``
        estimates ``dQ₀/dP`` (module docstring)."""
        if not self.classifiers:
            raise RuntimeError("SourceClassifier is not fitted")
        alpha = self.mixture[self.target]
        odds = self.density_odds(features)
        if self.mode == "pooled":
            inv = 1.0 / np.maximum(odds["pooled"], 1e-30)  # Q_s / Q0 of the pooled sources
        else:  # Σ_i (β_i / (1−α))·Q_i/Q0
            inv = sum(self.mixture[s] / (1 - alpha) / np.maximum(o, 1e-30) for s, o in odds.items())
        p = 1.0 / (1.0 + inv)
        return p.astype(np.float32), np.full(p.shape, 1.0 - alpha, np.float32)

    def summary(self) -> dict:
        """JSON-ready: mode, mixture and each classifier's held-out report."""
        return {"mode": self.mode, "mixture": self.mixture, "reports": self.reports}


def attach_source_probs(arrays: dict, p: np.ndarray, a: np.ndarray, k: int) -> dict:
    """``arrays`` plus ``source_prob`` / ``source_share`` reshaped to ``[N, k]`` (row-major:
    response ``j`` of example ``i`` at flat index ``i·k + j``)."""
    p, a = np.asarray(p, np.float32), np.asarray(a, np.float32)
    if p.size % k or p.shape != a.shape:
        raise ValueError(f"p ({p.shape}) and a ({a.shape}) must have the same size, a multiple of k={k}")
    return {**arrays, "source_prob": p.reshape(-1, k), "source_share": a.reshape(-1, k)}
