"""What an experiment measures: the evaluators the driver (:mod:`alignshift.experiment.driver`)
calls for each seed.

An evaluator scores the reference (``setup``: the reference row of ``summary.json``, or None),
gives the training loop a held-out metric (``during_training``: ``state -> {name: value}``, or
None), scores each trained method (``evaluate``), formats the progress line (``line``), and may
add aggregate keys and plots at the end (``finish``). ``columns`` are the ``results.md``
table's ``(metric, header)`` pairs; ``panels`` the ``training_curves.png`` panels (None: no
plot).

* :class:`DeployEvaluator` — ShiftBench deployment test set (``shift_demo.py``, ``iw_dpo.py``);
* :class:`AlphaSweepEvaluator` — reward mixtures over α (``robust_dpo.py``);
* :class:`TargetEvaluator` — DoRA's target distribution (``dora.py``);
* :class:`QualityEvaluator` — FLR's ground-truth quality of sampled responses (``flr.py``);
* :class:`HeldOutEvaluator` — implicit-reward accuracy on held-out real pairs (``preference_hf.py``).
"""

from __future__ import annotations

import os

import numpy as np

from alignshift.data import PreferenceExample, encode_prompts, mix_reward
from alignshift.eval.alpha_sweep import alpha_key, curves_from_summary, plot_alpha_curves
from alignshift.eval.shift_eval import implicit_rewards, preference_accuracy, sample_and_score, win_rate

__all__ = ["Evaluator", "SampledEvaluator", "DeployEvaluator", "AlphaSweepEvaluator", "TargetEvaluator",
           "QualityEvaluator", "HeldOutEvaluator"]

NAN = float("nan")


class Evaluator:
    """The evaluator interface, with do-nothing defaults."""

    reference_name = "reference (SFT)"  # the reference row's name in ``methods``
    columns: list = []
    panels: list | None = None
    extra_sets = None  # data -> {name: examples}: more test sets the ShiftBench encoder adds
    name_width = 10  # of the method name in the progress line
    #: ``finish`` reads state ``setup`` built from the data (``--merge``, which runs no setup, refuses it)
    finish_needs_setup = False

    @property
    def paired_columns(self) -> list:
        """``columns`` without the training time: the metrics paired differences are reported on."""
        return [(k, h) for k, h in self.columns if k != "train_time_s"]

    def setup(self, ctx) -> dict | None:
        return None

    def during_training(self, ctx, objective):
        return None

    def evaluate(self, ctx, objective, params) -> dict:
        raise NotImplementedError

    def line(self, m: dict) -> str:
        return "  ".join(f"{k} {v:.3f}" for k, v in m.items())

    def finish(self, summary: dict, out: str) -> None:
        """Add aggregate keys to ``summary`` and write extra plots into ``out``."""


class SampledEvaluator(Evaluator):
    """Scores responses sampled from each policy for the first ``eval.n_prompts`` test prompts,
    against the reference's samples (win rate, KL); plus implicit-reward accuracies.

    A row is ``{**accuracies, **sampled metrics, <win_key>, "kl_to_ref"}``; the reference's
    accuracies are NaN (it has no implicit reward), its win rate 0.5 and its KL 0."""

    accuracy_keys: tuple = ()  # the first one is also measured during training
    win_key = "win_rate_vs_ref"

    def accuracies(self, ctx, objective, params) -> dict:
        return {}

    def sampled(self, ev: dict) -> dict:
        raise NotImplementedError

    def setup(self, ctx) -> dict:
        n_eval = min(ctx.cfg.eval.n_prompts, len(ctx.data.test))
        self.prompts = [ex.prompt for ex in ctx.data.test[:n_eval]]
        self.prompt_arrays = encode_prompts(ctx.tokenizer, self.prompts, max_prompt_len=ctx.cfg.data.max_prompt_len)
        self.ref_eval = self._sample(ctx, ctx.ref_params)
        return {**{k: NAN for k in self.accuracy_keys}, **self.sampled(self.ref_eval), self.win_key: 0.5,
                "kl_to_ref": 0.0}

    def _sample(self, ctx, params):
        return sample_and_score(ctx.graphdef, ctx.rest, params, ctx.ref_params, self.prompt_arrays, self.prompts,
                                key=ctx.eval_key, **ctx.sample_kwargs())

    def during_training(self, ctx, objective):
        if not self.accuracy_keys:
            return None
        key = self.accuracy_keys[0]
        return lambda state: {key: self.accuracies(ctx, objective, state["params"])[key]}

    def evaluate(self, ctx, objective, params) -> dict:
        acc = self.accuracies(ctx, objective, params)
        ev = self._sample(ctx, params)
        return {**acc, **self.sampled(ev), self.win_key: win_rate(ev["rewards"], self.ref_eval["rewards"]),
                "kl_to_ref": ev["kl_to_ref"]}


class DeployEvaluator(SampledEvaluator):
    """Deployment-test evaluation: implicit-reward accuracy on the test pairs, ground-truth
    reward / helpfulness / harm of sampled responses, win rate and KL vs the reference."""

    columns = [
        ("deploy_pref_acc", "deploy pref. acc."),
        ("deploy_reward", "deploy reward (sampled)"),
        ("helpfulness", "helpfulness"),
        ("harm", "harm"),
        ("win_rate_vs_ref", "win rate vs ref"),
        ("kl_to_ref", "KL to ref"),
    ]
    panels = [("loss", "training loss"), ("rewards/margins", "train reward margin"),
              ("eval/deploy_pref_acc", "deploy pref. accuracy (held out)")]
    accuracy_keys = ("deploy_pref_acc",)

    def accuracies(self, ctx, objective, params) -> dict:
        return {"deploy_pref_acc": preference_accuracy(ctx.logits_fn, params, ctx.sets["test"], objective)["pref_acc"]}

    def sampled(self, ev: dict) -> dict:
        return {"deploy_reward": ev["reward"], "helpfulness": ev.get("helpfulness", NAN), "harm": ev.get("harm", NAN)}

    def line(self, m: dict) -> str:
        return (f"deploy acc {m['deploy_pref_acc']:.3f}  reward {m['deploy_reward']:+.3f}  "
                f"harm {m['harm']:.3f}  KL {m['kl_to_ref']:.2f}")


class TargetEvaluator(SampledEvaluator):
    """DoRA on ``synthetic_shift``: implicit-reward accuracy on held-out TARGET pairs (all, and
    those whose responses differ in flattery: ``ctx.extra["flat_diff"]``), and the target
    reward / flattery count / win rate / KL of sampled responses."""

    columns = [
        ("target_pref_acc", "target pref. acc."),
        ("target_pref_acc_flat", "acc. (flattery differs)"),
        ("target_reward", "target reward (sampled)"),
        ("n_flat", "flattery words (sampled)"),
        ("win_rate_vs_ref", "win rate vs ref"),
        ("kl_to_ref", "KL to ref"),
    ]
    panels = [("loss", "training loss"), ("weights/ess", "weight ESS"),
              ("eval/target_pref_acc", "target pref. accuracy (held out)")]
    accuracy_keys = ("target_pref_acc", "target_pref_acc_flat")
    name_width = 12

    def accuracies(self, ctx, objective, params) -> dict:
        c, r = implicit_rewards(ctx.logits_fn, params, ctx.sets["test"], objective)
        hit = c > r
        return {"target_pref_acc": float(hit.mean()), "target_pref_acc_flat": float(hit[ctx.extra["flat_diff"]].mean())}

    def sampled(self, ev: dict) -> dict:
        return {"target_reward": ev["reward"], "n_flat": ev["n_flat"], "n_pad": ev["n_pad"],
                "helpfulness": ev["helpfulness"]}

    def line(self, m: dict) -> str:
        return (f"target acc {m['target_pref_acc']:.3f} (flat {m['target_pref_acc_flat']:.3f})  reward "
                f"{m['target_reward']:+.3f}  flattery {m['n_flat']:.2f}  KL {m['kl_to_ref']:.2f}")


class QualityEvaluator(SampledEvaluator):
    """FLR on ``followup``: each policy's ground-truth quality of sampled test responses, win
    rate and KL vs the SFT policy (the method rows add their mined pairs' label accuracy)."""

    reference_name = "SFT (reference)"
    columns = [("quality", "GT quality (sampled)"), ("win_rate_vs_sft", "win rate vs SFT"),
               ("kl_to_ref", "KL to SFT"), ("pair_label_acc", "mined-pair label acc."), ("n_pairs", "# pairs")]
    win_key = "win_rate_vs_sft"
    name_width = 24

    def setup(self, ctx) -> dict:
        return {**super().setup(ctx), "pair_label_acc": NAN, "n_pairs": 0.0, "train_time_s": 0.0}

    def sampled(self, ev: dict) -> dict:
        return {"quality": ev["reward"]}

    def line(self, m: dict) -> str:
        return (f"quality {m['quality']:.3f} (SFT {self.ref_eval['reward']:.3f})  label acc "
                f"{m['pair_label_acc']:.3f}  pairs {int(m['n_pairs'])}  KL {m['kl_to_ref']:.2f}")


class _ChatTokenizer:
    """What :func:`~alignshift.eval.shift_eval.sample_and_score` reads of a tokenizer
    (``eos_id``, ``pad_id``, ``decode``), for a Hugging Face tokenizer: generation stops at
    its EOS (ChatML's ``<|im_end|>``: the end of the assistant turn); special tokens are
    dropped from the decoded text."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_id = tok.eos_token_id
        pad = tok.pad_token_id
        self.pad_id = int(pad if pad is not None else (tok.eos_token_id or 0))

    def decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def binomial_ci(hits: np.ndarray, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95% interval of a proportion (``hits``: booleans, one per pair)."""
    n = len(hits)
    if not n:
        return NAN, NAN
    p = float(np.mean(hits))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


class HeldOutEvaluator(Evaluator):
    """Real data: implicit-reward preference accuracy and reward margin on the held-out test
    (and validation) pairs. By default no reference row and no sampling (no reward model).

    Options (``eval``; off by default, and then the outputs are exactly the above):

    * ``reference_row``: a reference row, and Wilson 95% intervals ``<split>_pref_acc_lo/hi``
      of every row's accuracy. The reference policy's implicit reward is 0 for every pair
      (log π_ref − log π_ref), so its ``<split>_pref_acc`` is reported as NaN ("—") and its
      margin as 0; what it is measured by instead is its OWN ranking,
      ``<split>_ref_logp_acc``: the fraction of pairs whose chosen response has the higher
      MEAN per-token log-prob under the reference (summed log-probs favour short responses);
      ``<split>_ref_sum_logp_acc`` is the same with summed log-probs.
    * ``sample_prompts = N > 0``: for the first N held-out test prompts (chat-templated,
      left-padded, as encoded), one response each from the reference and from every trained
      policy (KV-cached sampler, ``eval.temperature/top_p/max_new_tokens``; temperature 0 is
      greedy), scored by :func:`~alignshift.eval.shift_eval.sample_and_score`: ``kl_to_ref``
      is the Monte-Carlo mean of log π(y) − log π_ref(y) over the policy's own responses (an
      unbiased KL estimate only when sampling at temperature 1, top_p 1), ``response_words``
      their mean length in words. The texts go to ``summary["samples"]`` (``prompts``,
      ``responses: {row name: [text]}``) and the seed's ``summary.json``.
    """

    reference_name = "reference"  # the loaded model itself: there is no SFT phase on real data
    base_columns = [("test_pref_acc", "test pref. acc."), ("test_reward_margin", "test reward margin"),
                    ("val_pref_acc", "val pref. acc."), ("train_time_s", "train time (s)")]
    columns = base_columns
    name_width = 12

    def __init__(self):
        self.samples = None
        self._n_evaluated = 0

    def _options(self, ctx):
        e = ctx.cfg.eval
        return bool(getattr(e, "reference_row", False)), int(getattr(e, "sample_prompts", 0) or 0)

    def setup(self, ctx) -> dict | None:
        ref_row, n_sample = self._options(ctx)
        self.samples, self._n_evaluated = None, 0
        self.columns = list(self.base_columns)
        if not ref_row and n_sample <= 0:
            return None
        row: dict = {}
        if ref_row:
            self.columns = [("test_pref_acc", "test pref. acc."), ("test_pref_acc_lo", "95% CI low"),
                            ("test_pref_acc_hi", "95% CI high"), ("test_reward_margin", "test reward margin"),
                            ("test_ref_logp_acc", "ref. mean log-prob ranking acc."),
                            ("val_pref_acc", "val pref. acc."), ("train_time_s", "train time (s)")]
            for split in ("test", "val"):
                if split in ctx.sets:
                    row.update(self._reference_ranking(ctx, split))
        if n_sample > 0 and "test" in ctx.sets:
            n = min(n_sample, ctx.sets["test"]["prompt_ids"].shape[0])
            arrays = ctx.sets["test"]
            self.prompt_arrays = {"prompt_ids": np.asarray(arrays["prompt_ids"][:n]),
                                  "prompt_mask": np.asarray(arrays["prompt_mask"][:n])}
            examples = ctx.data.split("test")[:n]
            self.prompts = [ex.prompt for ex in examples]
            self.samples = {"prompts": self.prompts,
                            "turns": [len(ex.meta.get("prompt_messages") or [None]) for ex in examples],
                            "temperature": float(ctx.cfg.eval.temperature),
                            "max_new_tokens": int(ctx.cfg.eval.max_new_tokens), "responses": {}}
            ctx.summary["samples"] = self.samples
            self.columns = self.columns[:-1] + [("kl_to_ref", "KL to ref (sampled)"),
                                                ("response_words", "response words"), self.columns[-1]]
            row.update(self._sample(ctx, ctx.ref_params, self.reference_name))
        return row

    def _reference_ranking(self, ctx, split: str) -> dict:
        """The reference's own ranking of the split's pairs (mean and summed log-probs)."""
        from alignshift.train.phases import precompute_reference_logps

        a = ctx.sets[split]
        if "reference_chosen_logps" in a and "reference_rejected_logps" in a:
            c, r = np.asarray(a["reference_chosen_logps"]), np.asarray(a["reference_rejected_logps"])
        else:
            lp = precompute_reference_logps(ctx.logits_fn, ctx.ref_params, a, groups=("chosen", "rejected"),
                                            batch_size=ctx.cfg.eval.batch_size)
            c, r = lp["reference_chosen_logps"], lp["reference_rejected_logps"]
        # the tokens scored: the loss mask after the next-token shift
        nc = np.maximum(np.asarray(a["chosen_loss_mask"])[:, 1:].sum(1), 1)
        nr = np.maximum(np.asarray(a["rejected_loss_mask"])[:, 1:].sum(1), 1)
        hit = c / nc > r / nr
        lo, hi = binomial_ci(hit)
        return {f"{split}_pref_acc": NAN, f"{split}_reward_margin": 0.0, f"{split}_ref_logp_acc": float(hit.mean()),
                f"{split}_ref_logp_acc_lo": lo, f"{split}_ref_logp_acc_hi": hi,
                f"{split}_ref_sum_logp_acc": float(np.mean(c > r)), f"{split}_n_pairs": float(len(hit))}

    def _sample(self, ctx, params, name: str) -> dict:
        e = ctx.cfg.eval
        ev = sample_and_score(ctx.graphdef, ctx.rest, params, ctx.ref_params, self.prompt_arrays, self.prompts,
                              tokenizer=_ChatTokenizer(ctx.tokenizer), reward_fn=lambda p, r: 0.0,
                              metrics_fn=lambda p, r: {"response_words": float(len(r.split()))},
                              key=ctx.eval_key, max_new_tokens=e.max_new_tokens, temperature=e.temperature,
                              top_p=e.top_p, batch_size=e.batch_size)
        self.samples["responses"][name] = list(ev["responses"])
        return {"kl_to_ref": ev["kl_to_ref"], "response_words": ev["response_words"]}

    def during_training(self, ctx, objective):
        if "test" not in ctx.sets or not ctx.cfg.train.eval_every:
            return None
        test, bs = ctx.sets["test"], ctx.cfg.eval.batch_size
        return lambda state: {"test_pref_acc": preference_accuracy(ctx.logits_fn, state["params"], test, objective,
                                                                   batch_size=bs)["pref_acc"]}

    def evaluate(self, ctx, objective, params) -> dict:
        ref_row, n_sample = self._options(ctx)
        # the driver evaluates the methods in config order: the k-th call is methods[k]
        names = [m.name for m in ctx.cfg.methods]
        k, self._n_evaluated = self._n_evaluated, self._n_evaluated + 1
        name = names[k] if k < len(names) else f"policy {k}"
        row = {}
        for split in ("test", "val"):
            if split in ctx.sets:
                if not ref_row:
                    acc = preference_accuracy(ctx.logits_fn, params, ctx.sets[split], objective,
                                              batch_size=ctx.cfg.eval.batch_size)
                    row[f"{split}_pref_acc"] = acc["pref_acc"]
                    row[f"{split}_reward_margin"] = acc["reward_margin"]
                    continue
                c, r = implicit_rewards(ctx.logits_fn, params, ctx.sets[split], objective,
                                        batch_size=ctx.cfg.eval.batch_size)
                hit = c > r  # ties count as wrong, as in preference_accuracy
                lo, hi = binomial_ci(hit)
                row.update({f"{split}_pref_acc": float(np.mean(hit)), f"{split}_pref_acc_lo": lo,
                            f"{split}_pref_acc_hi": hi, f"{split}_reward_margin": float(np.mean(c - r)),
                            f"{split}_n_pairs": float(len(hit))})
        if n_sample > 0 and self.samples is not None:
            row.update(self._sample(ctx, params, name))
        return row

    def finish(self, summary: dict, out: str) -> None:
        if self.samples is not None:
            summary["samples"] = self.samples


class AlphaSweepEvaluator(Evaluator):
    """``preference_shift`` (WDPO / KLDPO): training labels come from the α₀ mixture of two
    ground-truth rewards; each policy is evaluated over the scenario's α grid with convex and
    geometric mixing (see :mod:`alignshift.eval.alpha_sweep`):

    * ``acc/<kind>/<α>``: implicit-reward accuracy on the SAME test pairs relabelled by the
      (kind, α) mixture;
    * ``reward/<kind>/<α>``: mean (kind, α)-mixed ground-truth reward of responses sampled for
      the test prompts (one sample set per method, re-scored per α);
    * ``kl_to_ref``.

    ``finish`` adds ``curves`` (per-method mean ± s.e. per α) to the summary and writes
    ``alpha_curves.png``."""

    panels = [("loss", "training loss"), ("rewards/margins", "train reward margin"),
              ("eval/pref_acc_alpha0", "held-out accuracy at α₀")]
    finish_needs_setup = True  # the α grid and mixing kinds come from the scenario's data

    @staticmethod
    def extra_sets(data) -> dict:
        # response_1 as "chosen", response_2 as "rejected": the labels per α say which won
        return {"pairs": [PreferenceExample(p, a, b) for p, a, b in data.test_pairs]}

    def setup(self, ctx) -> dict:
        data = ctx.data
        self.alphas = list(data.alphas)
        self.kinds = list(data.mixing)
        self.alpha0 = data.alpha0
        first = [a for _, a, _ in data.test_pairs]
        self.labels = {  # True where response_1 is preferred under (kind, α)
            (k, a): np.asarray([ex.chosen == r1 for ex, r1 in zip(data.test_at(a, k), first)])
            for k in self.kinds for a in self.alphas
        }
        n = min(ctx.cfg.eval.n_prompts, len(data.test_pairs))
        self.prompts = [p for p, _, _ in data.test_pairs[:n]]
        self.prompt_arrays = encode_prompts(data.tokenizer, self.prompts, max_prompt_len=ctx.cfg.data.max_prompt_len)
        self.columns = [(alpha_key("acc", "convex", self.alpha0), "acc α₀"),
                        (alpha_key("acc", "convex", 0.5), "acc α=.5 (convex)"),
                        (alpha_key("acc", "convex", 1.0), "acc α=1 (convex)"),
                        (alpha_key("acc", "geometric", 1.0), "acc α=1 (geom.)"),
                        (alpha_key("reward", "convex", self.alpha0), "reward α₀"),
                        (alpha_key("reward", "convex", 1.0), "reward α=1 (convex)"),
                        ("kl_to_ref", "KL to ref")]
        out = {alpha_key("acc", k, a): NAN for k in self.kinds for a in self.alphas}
        out.update(self._rewards(ctx, ctx.ref_params))
        return out

    def _rewards(self, ctx, params) -> dict:
        ev = sample_and_score(ctx.graphdef, ctx.rest, params, ctx.ref_params, self.prompt_arrays, self.prompts,
                              key=ctx.eval_key, **ctx.sample_kwargs())
        ra = np.asarray([m["r_A"] for m in ev["per_sample"]])
        rb = np.asarray([m["r_B"] for m in ev["per_sample"]])
        out = {alpha_key("reward", k, a): float(np.mean(mix_reward(ra, rb, a, k)))
               for k in self.kinds for a in self.alphas}
        out["kl_to_ref"] = ev["kl_to_ref"]
        return out

    def _accuracies(self, ctx, objective, params, kinds_alphas) -> dict:
        c, r = implicit_rewards(ctx.logits_fn, params, ctx.sets["pairs"], objective)
        return {alpha_key("acc", k, a): float(np.mean(np.where(self.labels[(k, a)], c > r, r > c)))
                for k, a in kinds_alphas}

    def during_training(self, ctx, objective):
        a0 = alpha_key("acc", "convex", self.alpha0)
        return lambda state: {"pref_acc_alpha0": self._accuracies(
            ctx, objective, state["params"], [("convex", self.alpha0)])[a0]}

    def evaluate(self, ctx, objective, params) -> dict:
        out = self._accuracies(ctx, objective, params, [(k, a) for k in self.kinds for a in self.alphas])
        out.update(self._rewards(ctx, params))
        return out

    def line(self, m: dict) -> str:
        a0, a1 = alpha_key("acc", "convex", self.alpha0), alpha_key("acc", "convex", 1.0)
        return (f"acc α₀ {m[a0]:.3f}  acc α=1 {m[a1]:.3f}  reward α₀ {m[alpha_key('reward', 'convex', self.alpha0)]:.3f}"
                f"  KL {m['kl_to_ref']:.2f}")

    def finish(self, summary: dict, out: str) -> None:
        summary["curves"] = curves_from_summary(summary, self.alphas, self.kinds)
        plot_alpha_curves(summary["curves"], os.path.join(out, "alpha_curves.png"), alpha0=self.alpha0)
