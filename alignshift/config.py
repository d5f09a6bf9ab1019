"""Typed dataclass configs, loaded from YAML with dotted ``key=value`` CLI overrides.

Every experiment script takes ``--config PATH``, ``--out DIR``, ``--seeds N``, ``--quick`` and
overrides such as ``train.lr=5e-4`` or ``methods.0.base_kwargs.beta=0.2``. An unknown key,
a value of the wrong type or an impossible combination raises :class:`ConfigError` naming
the key (with a suggestion when the key looks like a typo).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "LoRASettings",
    "ModelConfig",
    "DataConfig",
    "OptimConfig",
    "SFTConfig",
    "TrainConfig",
    "MethodConfig",
    "EvalConfig",
    "MeshConfig",
    "TuningConfig",
    "ExperimentConfig",
    "from_dict",
    "to_dict",
    "load_config",
    "apply_overrides",
]


class ConfigError(ValueError):
    """A config problem, naming the offending key."""


@dataclasses.dataclass
class LoRASettings:
    """LoRA for the preference phase (``alignshift.models.lora``): SFT trains the full model
    (that is the reference); adapters are then added and only they are trained; the reference
    is the same graph with the adapters zeroed (no second copy of the weights)."""

    enabled: bool = False
    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = dataclasses.field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclasses.dataclass
class ModelConfig:
    """The policy. With ``hf_path`` set, the model is loaded from that local HF folder
    (``alignshift.models.load_hf_model``: Llama, Mistral, Gemma 1/2, GPT-NeoX, GPT-2) and the size
    fields below are ignored; otherwise a tiny Llama with these HF-named sizes is initialised
    (``vocab_size`` 0 = from the tokenizer)."""

    hf_path: str = ""
    vocab_size: int = 0
    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    remat: bool = False
    lora: LoRASettings = dataclasses.field(default_factory=LoRASettings)


@dataclasses.dataclass
class DataConfig:
    """Which benchmark scenario, its generator arguments, and the tokenisation budget."""

    scenario: str = "deploy_shift"
    scenario_kwargs: dict = dataclasses.field(default_factory=dict)
    max_prompt_len: int = 8
    max_completion_len: int = 10
    # A real dataset instead of the benchmark: a name registered in
    # ``alignshift.data.datasets.DATASETS`` ("" = use ``scenario``), its source (hub name or
    # local path; "" = the dataset's hub name) and its loader arguments (split recipe, filters).
    # Read by experiments/preference_hf.py only; the benchmark scripts refuse a config setting it.
    dataset: str = ""
    dataset_source: str = ""
    dataset_kwargs: dict = dataclasses.field(default_factory=dict)
    # chat-template tokenisation (``alignshift.data.chat``): auto | chat | raw; optional system prompt
    chat_mode: str = "auto"
    system_prompt: str = ""
    # bad rows (missing/empty fields, chosen == rejected, non-UTF-8, ...): raise naming the row
    # (False), or drop them and report how many (True; the CLI's --skip-bad-rows)
    skip_bad_rows: bool = False
    # rows longer than max_prompt_len / max_completion_len: truncate | error | skip
    truncation: str = "truncate"
    # KTO's mismatched kl_* completions (its reference point): "trl" (the previous example's
    # chosen and rejected responses, alternating, as TRL's batches mix them) or
    # "previous_chosen" (the previous example's chosen response; this project's former default)
    kl_pairing: str = "trl"


@dataclasses.dataclass
class OptimConfig:
    """AdamW with a linear warm-up from 0 to ``lr`` and a cosine decay to ``min_lr_ratio·lr``
    (``alignshift.train.optim.make_schedule``)."""

    lr: float = 1e-3
    warmup_steps: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8  # Adam's epsilon
    # > 0: the warm-up lasts ceil(warmup_ratio x schedule steps) steps (OpenRLHF's / HF's
    # warmup_ratio) instead of warmup_steps; 0 = warmup_steps
    warmup_ratio: float = 0.0
    # the cosine ends at min_lr_ratio x lr (OpenRLHF's cosine_with_min_lr: 0.1); 0 = decays to 0
    min_lr_ratio: float = 0.0
    # length of the schedule in steps (0 = the phase's steps): > steps runs the first steps of a
    # longer schedule (a paper's N-epoch schedule evaluated at an earlier checkpoint)
    schedule_steps: int = 0


@dataclasses.dataclass
class SFTConfig:
    steps: int = 300
    batch_size: int = 64
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))


@dataclasses.dataclass
class TrainConfig:
    """The preference-optimisation phase."""

    steps: int = 150
    batch_size: int = 32
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(lr=5e-4, warmup_steps=10))
    precompute_reference: bool = True  # reference log-probs once up front, else in every step
    log_every: int = 10
    eval_every: int = 50  # held-out deployment preference accuracy during training (0 = off)
    checkpoint_every: int = 0  # 0 = no intermediate checkpoints
    # deployment/validation batch per step, for rules that need one (IW-DPO); capped at the
    # validation set's size
    val_batch_size: int = 16
    # directory of the on-disk reference log-prob cache ("" = off); entries are keyed by the
    # data, the reference weights, the model config and the tokenisation (alignshift/train/ref_cache.py)
    reference_cache_dir: str = ""
    # > 0: log-probs computed this many positions at a time from the final hidden states, so the
    # [B, T, V] float32 logits are never materialised (SFT and preference steps; large vocabularies)
    logits_chunk: int = 0
    # True: the LM head and log-softmax run on the data.max_completion_len positions from each
    # sequence's first response token only, not on prompt positions (same loss; less work when
    # prompts are long; benchmarks/README.md). A response longer than the window cannot occur
    # (the encoder truncates to max_completion_len); if one did, its log-prob is NaN, not cut.
    logits_on_responses: bool = False
    # a step with a non-finite loss or gradient is not applied; this many in a row stop the run
    # (the offending batch is written next to the checkpoints; alignshift/train/loop.py)
    max_consecutive_nonfinite: int = 10
    # > 0: preference training batches come from alignshift.data.chat.LengthBucketIterator:
    # examples of similar length are batched together and each batch's padding is trimmed to a
    # multiple of this many tokens (fewer padded positions, at most T / length_bucket compiled
    # shapes; the data order stays a pure function of seed + step, so resume is exact).
    # 0 = off (every batch padded to the full data.max_prompt_len + data.max_completion_len).
    # Pairwise batches only: refused with listwise base losses (pl, rrhf, lire).
    length_bucket: int = 0
    # gradient accumulation: each step's batch (train.batch_size pairs, the effective batch) is
    # split into this many equal micro-batches run one after another; the update equals one step
    # over the whole batch (alignshift/train/accumulate.py). batch_size must be divisible by it.
    grad_accum_steps: int = 1
    # with grad_accum_steps > 1, what a batch-coupled weighting rule (KLDPO's tilt, DR-DPO's and
    # DoRA's log-mean-exp, IW-DPO's KMM, KTO's reference point) reduces over: "global" (the whole
    # batch: a forward-only pass computes every example's loss first) or "micro_batch" (each
    # micro-batch is its own batch, as the authors' DR-DPO code does with gradient accumulation)
    weighting_scope: str = "global"
    # pack pairs into fixed-length rows (segment ids; attention confined to a segment; positions
    # restart per segment) instead of padding each sequence to the longest row
    packing: bool = False
    # lay a pair out as [prompt | chosen | rejected] in one row (the prompt computed once)
    share_prompt: bool = False
    # where training metrics also go (the metrics.jsonl names, plus the run's config): a list of
    # "jsonl" (metrics.jsonl: always written, the results files read it), "tensorboard" (event
    # files under <out>/tensorboard), "wandb" (Weights & Biases, offline unless logged in); one
    # name alone is accepted too. alignshift/train/tracking.py; extras [tensorboard], [wandb]
    report_to: list[str] | str = dataclasses.field(default_factory=lambda: ["jsonl"])


WEIGHTING_SCOPES = ("global", "micro_batch")
#: ``train.report_to`` names -> (the module the tracker needs, the pip extra that installs it)
REPORT_TO = {"jsonl": (None, None), "tensorboard": ("tensorboardX", "tensorboard"), "wandb": ("wandb", "wandb")}
TRAIN_DATA_CHOICES = ("train", "val", "train+val", "oracle")


@dataclasses.dataclass
class MethodConfig:
    """One method: base loss x weighting rule (+ penalty), and the data it trains on:
    ``train`` (D_tr), ``val`` (the small deployment set D_v alone), ``train+val``, or
    ``oracle`` (a D_tr-sized set drawn from the deployment distribution: an upper reference)."""

    name: str = "dpo"
    base: str = "dpo"
    weighting: str = "uniform"
    penalty: str | None = None
    base_kwargs: dict = dataclasses.field(default_factory=dict)
    weighting_kwargs: dict = dataclasses.field(default_factory=dict)
    penalty_kwargs: dict = dataclasses.field(default_factory=dict)
    train_data: str = "train"
    # per-example data weights (multiplied into any rule): "" none, or "true_density_ratio"
    # (the benchmark's known p_deploy/p_train per example: the ceiling for importance weighting)
    example_weights: str = ""
    # how the train step takes the penalty's parameter gradient, {mode, fd_eps, pairs}: a training
    # setting, not a hyper-parameter (alignshift.losses.penalties.PenaltyGradient; default exact)
    penalty_gradient: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class EvalConfig:
    n_prompts: int = 256  # deployment-test prompts to sample responses for
    max_new_tokens: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    batch_size: int = 256
    # real data (experiments/preference_hf.py, HeldOutEvaluator); off by default:
    # a reference row (the reference model's own ranking of the held-out pairs) and binomial 95%
    # intervals of the held-out accuracies
    reference_row: bool = False
    # responses of the reference and each policy for the first N held-out prompts (temperature,
    # top_p, max_new_tokens above) and the Monte-Carlo KL to the reference on them (0 = none)
    sample_prompts: int = 0


@dataclasses.dataclass
class MeshConfig:
    """The device mesh a run expects (``alignshift.parallel.make_mesh``; one axis may be -1 =
    the rest of the devices) and, for ``--dry-run`` on a machine without them, the device
    count to plan for (0 = the devices present)."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    devices: int = 0
    # memory of one device in GiB that the run is planned for (0 = unchecked); ``--dry-run``
    # fails when its per-device estimate exceeds it
    device_memory_gb: float = 0.0


TUNING_STRATEGIES = ("random", "grid")
TUNING_METRICS = ("pref_acc",)
TUNING_TRAIN_KEYS = ("train.optim.lr", "train.steps", "train.optim.warmup_steps", "train.optim.weight_decay")


@dataclasses.dataclass
class TuningConfig:
    """Equal tuning budgets (alignshift/experiment/tuning.py): with ``enabled``, every method is
    trained on ``budget`` configurations and the one with the best ``metric`` on a held-out
    share (``val_fraction``) of the TRAINING pairs is reported on the test set.

    ``grid`` (shared by every method: ``{"train.optim.lr": [...], "base_kwargs.beta": [...]}``)
    and ``method_grid`` (a method's own knobs on top: ``{name: {"weighting_kwargs.tau": [...]}}``)
    give each method's candidate grid (their product); a shared key a method's loss does not take
    (β of RRHF) is left out for it. ``strategy`` ``random``: ``budget`` distinct configurations
    drawn (seeded) from that product, ``grid``: the product itself, whose size must be
    ``budget``. ``baseline``: the method every other is compared with, paired over seeds
    (summary ``paired_vs_dpo``; "" = ``dpo``, ``dpo_train``, or the first plain DPO row)."""

    enabled: bool = False
    budget: int = 0
    strategy: str = "random"
    seed: int = 0
    metric: str = "pref_acc"
    val_fraction: float = 0.2
    grid: dict = dataclasses.field(default_factory=dict)
    method_grid: dict = dataclasses.field(default_factory=dict)
    baseline: str = ""


@dataclasses.dataclass
class ExperimentConfig:
    scenario: str = "shift_demo"
    seed: int = 0
    seeds: int = 1
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    methods: list[MethodConfig] = dataclasses.field(default_factory=lambda: [MethodConfig()])
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    tuning: TuningConfig = dataclasses.field(default_factory=TuningConfig)
    # Overrides applied by ``--quick`` (dotted keys), for a ~1 minute CPU run used by tests.
    quick: dict = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------------ loading


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(value: Any, tp: Any, key: str) -> Any:
    tp, optional = _unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r} may not be null")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping; got {type(value).__name__}")
        return from_dict(tp, value, prefix=key)
    origin = typing.get_origin(tp)
    if origin is list:
        (item_tp,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(f"config key {key!r} must be a list; got {type(value).__name__}")
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping; got {type(value).__name__}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config key {key!r} must be a bool; got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key {key!r} must be an int; got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be an int; got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} must be a number; got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key {key!r} must be a string; got {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    """Build dataclass ``cls`` from a (possibly partial) dict; unknown keys raise."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {(prefix + '.' if prefix else '') + close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}; valid keys here: {names}")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _parse_scalar(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b.c=value`` overrides to a plain dict (list items by index: ``methods.0.base``)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for i, p in enumerate(parts[:-1]):
            where = ".".join(parts[: i + 1])
            if isinstance(node, list):
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {key!r}: {where!r} is not a valid list index")
                node = node[int(p)]
            else:
                if p not in node or node[p] is None:
                    node[p] = {}
                node = node[p]
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {key!r}: {where!r} is not a mapping")
        last = parts[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ConfigError(f"override {key!r}: {last!r} is not a valid list index")
            node[int(last)] = _parse_scalar(raw)
        else:
            node[last] = _parse_scalar(raw)
    return data


def read_config_file(path: str | None) -> dict:
    """The YAML mapping in ``path`` (``{}`` for None); :class:`ConfigError` naming the file when
    it is missing, not valid YAML or not a mapping."""
    if path is None:
        return {}
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at top level")
    return data


def load_config(path: str | None, overrides: list[str] = (), *, quick: bool = False, cls=ExperimentConfig):
    """Load YAML (or defaults when ``path`` is None), apply ``--quick`` then CLI overrides."""
    data = read_config_file(path)
    base = to_dict(from_dict(cls, data))  # validates the file itself first
    quick_items = [f"{k}={_dump(v)}" for k, v in base.get("quick", {}).items()] if quick else []
    if quick:
        base = apply_overrides(base, quick_items)
    cfg = from_dict(cls, apply_overrides(base, list(overrides)))
    if cls is ExperimentConfig:
        explicit = _flat_keys(data) | {o.split("=", 1)[0].strip() for o in [*quick_items, *overrides] if "=" in o}
        validate(cfg, explicit=explicit)
    else:
        validate(cfg)
    return cfg


def _flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.add(key)
        if isinstance(v, dict):
            out |= _flat_keys(v, key + ".")
    return out


def _dump(v) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def _check_optim(prefix: str, o: OptimConfig, explicit=frozenset()) -> None:
    import math

    for name in ("lr", "weight_decay", "grad_clip", "b1", "b2", "eps"):
        if not math.isfinite(getattr(o, name)):
            raise ConfigError(f"config key '{prefix}.{name}' must be finite; got {getattr(o, name)!r}")
    for name in ("lr", "weight_decay", "grad_clip", "warmup_steps", "schedule_steps"):
        if getattr(o, name) < 0:
            raise ConfigError(f"config key '{prefix}.{name}' must be >= 0; got {getattr(o, name)!r}")
    if not (math.isfinite(o.warmup_ratio) and 0.0 <= o.warmup_ratio < 1.0):
        raise ConfigError(f"config key '{prefix}.warmup_ratio' must be in [0, 1); got {o.warmup_ratio!r}")
    if not (math.isfinite(o.min_lr_ratio) and 0.0 <= o.min_lr_ratio <= 1.0):
        raise ConfigError(f"config key '{prefix}.min_lr_ratio' must be in [0, 1]; got {o.min_lr_ratio!r}")
    if o.warmup_ratio > 0 and o.warmup_steps and f"{prefix}.warmup_steps" in explicit:
        raise ConfigError(f"config keys '{prefix}.warmup_steps' and '{prefix}.warmup_ratio' are both set: the "
                          "warm-up is one or the other (set warmup_steps to 0, or warmup_ratio to 0)")
    for name in ("b1", "b2"):
        if not 0.0 <= getattr(o, name) < 1.0:
            raise ConfigError(f"config key '{prefix}.{name}' must be in [0, 1); got {getattr(o, name)!r}")
    if o.eps <= 0:
        raise ConfigError(f"config key '{prefix}.eps' must be > 0; got {o.eps!r}")


def validate(cfg: ExperimentConfig, *, explicit: set[str] | frozenset = frozenset()) -> None:
    """Cross-field checks that the type system cannot express. ``explicit``: the dotted keys the
    user set (file or overrides), for checks that only apply to an explicit request."""
    from alignshift.losses.hparams import HParamError
    from alignshift.losses.objective import BASE_LOSSES, make_objective
    from alignshift.losses.penalties import PenaltyGradient
    from alignshift.losses.weighting import WEIGHTING_RULES

    names = [m.name for m in cfg.methods]
    if not names:
        raise ConfigError("config key 'methods' must list at least one method")
    if len(set(names)) != len(names):
        raise ConfigError(f"config key 'methods' has duplicate names: {names}")
    for i, m in enumerate(cfg.methods):
        try:  # names, then hyper-parameter types and ranges (each loss / rule / penalty's HParam specs)
            make_objective(m.base, m.weighting, m.penalty, base_kwargs=m.base_kwargs,
                           weighting_kwargs=m.weighting_kwargs, penalty_kwargs=m.penalty_kwargs)
        except HParamError as e:
            raise ConfigError(f"config key {f'methods.{i}.{e.group}.{e.key}'!r} {e.problem}") from None
        except ValueError as e:
            raise ConfigError(f"config key 'methods.{i}' ({m.name}): {e}") from None
        if m.example_weights not in ("", "true_density_ratio"):
            raise ConfigError(f"config key 'methods.{i}.example_weights' must be '' or 'true_density_ratio'; "
                              f"got {m.example_weights!r}")
        if m.train_data not in TRAIN_DATA_CHOICES:
            raise ConfigError(f"config key 'methods.{i}.train_data' must be one of {TRAIN_DATA_CHOICES}; "
                              f"got {m.train_data!r}")
        try:
            gradient = PenaltyGradient.from_dict(m.penalty_gradient)
        except ValueError as e:
            raise ConfigError(f"config key 'methods.{i}.penalty_gradient' ({m.name}): {e}") from None
        if gradient.first_order and m.penalty is None:
            raise ConfigError(f"config key 'methods.{i}.penalty_gradient' ({m.name}) asks for mode "
                              f"{gradient.mode!r}, but the method has no penalty")
    for key in ("sft.steps", "train.steps", "sft.batch_size", "train.batch_size", "seeds"):
        obj = cfg
        for p in key.split("."):
            obj = getattr(obj, p)
        if obj <= 0:
            raise ConfigError(f"config key {key!r} must be positive; got {obj}")
    if cfg.model.hidden_size % cfg.model.num_attention_heads:
        raise ConfigError("config key 'model.hidden_size' must be divisible by 'model.num_attention_heads'")
    if cfg.model.num_attention_heads % cfg.model.num_key_value_heads:
        raise ConfigError("config key 'model.num_attention_heads' must be divisible by 'model.num_key_value_heads'")
    if cfg.model.dtype not in ("float32", "bfloat16"):
        raise ConfigError(f"config key 'model.dtype' must be float32 or bfloat16; got {cfg.model.dtype!r}")
    _validate_reliability(cfg, explicit, BASE_LOSSES, WEIGHTING_RULES)
    _validate_tuning(cfg)


def _kwargs_groups(m: MethodConfig) -> dict[str, tuple[str, str | None]]:
    """A method's hyper-parameter groups: config key prefix -> (kind, its loss / rule / penalty)."""
    return {"base_kwargs": ("base", m.base), "weighting_kwargs": ("weighting", m.weighting),
            "penalty_kwargs": ("penalty", m.penalty)}


def tuning_grid(cfg: ExperimentConfig, m: MethodConfig) -> dict[str, list]:
    """Method ``m``'s candidate grid ``{dotted key: values}``: ``tuning.grid``'s keys that apply
    to it (a ``base_kwargs``/``weighting_kwargs``/``penalty_kwargs`` key its loss, rule or penalty
    takes; every ``train.*`` key), then ``tuning.method_grid[m.name]``'s (which override)."""
    from alignshift.losses.objective import hparam_specs

    def applies(key: str) -> bool:
        group, _, name = key.partition(".")
        kind = _kwargs_groups(m).get(group)
        if kind is None:
            return True
        return kind[1] is not None and name in hparam_specs(*kind)

    out = {k: list(v) for k, v in flat_grid(cfg.tuning.grid).items() if applies(k)}
    out.update({k: list(v) for k, v in flat_grid(cfg.tuning.method_grid.get(m.name) or {}).items()})
    return out


def flat_grid(grid: dict, prefix: str = "") -> dict:
    """A tuning grid with nested mappings flattened to dotted keys (a CLI override
    ``tuning.grid.train.optim.lr=[...]`` arrives nested)."""
    out = {}
    for k, v in grid.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_grid(v, key + "."))
        else:
            out[key] = v
    return out


def _validate_tuning(cfg: ExperimentConfig) -> None:
    """The ``tuning`` section: names, grid keys and values (each value checked like the
    hyper-parameter or setting it replaces), and that every method can fill the budget."""
    import math

    from alignshift.losses.hparams import HParamError
    from alignshift.losses.objective import check_hparams

    t = cfg.tuning
    if t.strategy not in TUNING_STRATEGIES:
        raise ConfigError(f"config key 'tuning.strategy' must be one of {TUNING_STRATEGIES}; got {t.strategy!r}")
    if t.metric not in TUNING_METRICS:
        raise ConfigError(f"config key 'tuning.metric' must be one of {TUNING_METRICS}; got {t.metric!r}")
    if not (math.isfinite(t.val_fraction) and 0.0 < t.val_fraction < 1.0):
        raise ConfigError(f"config key 'tuning.val_fraction' must be in (0, 1); got {t.val_fraction!r}")
    if t.budget < 0 or (t.enabled and t.budget < 1):
        raise ConfigError(f"config key 'tuning.budget' must be >= 1 when tuning.enabled; got {t.budget}")
    names = [m.name for m in cfg.methods]
    if t.baseline and t.baseline not in names:
        raise ConfigError(f"config key 'tuning.baseline' is {t.baseline!r}, not one of the methods {names}")
    unknown = sorted(set(t.method_grid) - set(names))
    if unknown:
        raise ConfigError(f"config key 'tuning.method_grid' names unknown method(s) {unknown}; the methods are {names}")
    sections = [("tuning.grid", t.grid)] + [(f"tuning.method_grid.{n}", g) for n, g in t.method_grid.items()]
    for where, grid in sections:
        if not isinstance(grid, dict):
            raise ConfigError(f"config key {where!r} must be a mapping of dotted keys to lists of values")
        for key, values in flat_grid(grid).items():
            k = f"{where}.{key}"
            if not isinstance(values, list) or not values:
                raise ConfigError(f"config key {k!r} must be a non-empty list of values; got {values!r}")
            if len({repr(v) for v in values}) != len(values):
                raise ConfigError(f"config key {k!r} lists a value twice: {values}")
            group = key.partition(".")[0]
            if key.startswith("train."):
                if key not in TUNING_TRAIN_KEYS:
                    raise ConfigError(f"config key {k!r}: tunable train settings are {list(TUNING_TRAIN_KEYS)}")
                def number(v):  # as the typed field would take it ('1e-4' from YAML is a string)
                    try:
                        return None if isinstance(v, bool) else float(v)
                    except (TypeError, ValueError):
                        return None
                bad = [v for v in values if number(v) is None or not math.isfinite(number(v)) or number(v) < 0
                       or (key in ("train.optim.lr", "train.steps") and number(v) <= 0)]
                if bad:
                    raise ConfigError(f"config key {k!r} must list positive numbers; got {bad}")
            elif group not in ("base_kwargs", "weighting_kwargs", "penalty_kwargs") or key.count(".") != 1:
                raise ConfigError(f"config key {k!r}: a grid key is 'base_kwargs.<name>', 'weighting_kwargs.<name>', "
                                  f"'penalty_kwargs.<name>' or one of {list(TUNING_TRAIN_KEYS)}")
    for i, m in enumerate(cfg.methods):
        grid = tuning_grid(cfg, m)
        kinds = _kwargs_groups(m)
        own = flat_grid(t.method_grid.get(m.name) or {})
        for key, values in grid.items():
            group, _, name = key.partition(".")
            if group not in kinds:
                continue
            kind, rule = kinds[group]
            where = f"tuning.method_grid.{m.name}.{key}" if key in own else f"tuning.grid.{key}"
            if rule is None:
                raise ConfigError(f"config key {where!r}: method {m.name!r} has no penalty")
            try:
                check_hparams(kind, rule, {name: None}, values=False)
                for v in values:
                    check_hparams(kind, rule, {name: v}, names=False)
            except HParamError as e:
                raise ConfigError(f"config key {where!r} ({m.name}): {e.key!r} {e.problem}") from None
            except ValueError as e:
                raise ConfigError(f"config key {where!r} ({m.name}): {e}") from None
        size = math.prod(len(v) for v in grid.values()) if grid else 1
        if t.enabled and t.strategy == "grid" and size != t.budget:
            raise ConfigError(f"config key 'tuning.budget' is {t.budget} but method {m.name!r} ('methods.{i}') has a "
                              f"grid of {size} configurations ({ {k: len(v) for k, v in grid.items()} }); with "
                              "tuning.strategy=grid every method's grid must have exactly the budget")
        if t.enabled and size < t.budget:
            raise ConfigError(f"config key 'tuning.budget' is {t.budget} but method {m.name!r} ('methods.{i}') has only "
                              f"{size} configurations in its grid ({ {k: len(v) for k, v in grid.items()} }): add "
                              f"values under 'tuning.method_grid.{m.name}' so every method gets the same budget")


def report_to_list(value, *, check_installed: bool = False) -> list[str]:
    """``train.report_to`` as a list of known names (a single name or a comma-separated string is
    accepted); with ``check_installed`` a tracker whose package is missing is an error naming
    the extra that installs it."""
    import importlib.util

    names = [v.strip() for v in value.split(",")] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(f"config key 'train.report_to' must be a name or a non-empty list of names from "
                          f"{sorted(REPORT_TO)}; got {value!r}")
    for n in names:
        if n not in REPORT_TO:
            raise ConfigError(f"config key 'train.report_to': unknown tracker {n!r}; choose from {sorted(REPORT_TO)}")
        module, extra = REPORT_TO[n]
        if check_installed and module is not None and importlib.util.find_spec(module) is None:
            raise ConfigError(f"config key 'train.report_to' asks for {n!r}, but its package {module!r} is not "
                              f"installed: pip install 'alignshift[{extra}]' (from a clone: pip install -e '.[{extra}]')")
    return list(dict.fromkeys(names))


def _validate_packing(cfg: ExperimentConfig) -> None:
    """``train.packing`` / ``train.share_prompt`` (alignshift/data/packing.py): combinations they refuse."""
    on = [k for k in ("packing", "share_prompt") if getattr(cfg.train, k)]
    if not on:
        return
    key = f"train.{on[0]}"
    if cfg.train.length_bucket > 0:
        raise ConfigError(f"config key {key!r} is true and 'train.length_bucket' is {cfg.train.length_bucket}: "
                          "packed rows have no padding to trim (set train.length_bucket=0)")
    for i, m in enumerate(cfg.methods):
        if m.penalty is not None:
            raise ConfigError(f"config key {key!r} is true, but 'methods.{i}' ({m.name}) has the penalty "
                              f"{m.penalty!r}, which differentiates through the input embeddings of padded "
                              "sequences and does not support packed rows (set train.packing and train.share_prompt to "
                              "false, or drop the penalty)")


def _validate_reliability(cfg: ExperimentConfig, explicit, BASE_LOSSES, WEIGHTING_RULES) -> None:
    """Impossible combinations and out-of-range loop/data settings (issue 10)."""
    from alignshift.data.schema import TRUNCATION_POLICIES

    for key, low in (("train.log_every", 1), ("train.eval_every", 0), ("train.checkpoint_every", 0),
                     ("train.max_consecutive_nonfinite", 1), ("train.val_batch_size", 1),
                     ("train.length_bucket", 0),
                     ("data.max_prompt_len", 1), ("data.max_completion_len", 1)):
        section, name = key.split(".")
        v = getattr(getattr(cfg, section), name)
        if v < low:
            raise ConfigError(f"config key {key!r} must be >= {low}; got {v}")
    _check_optim("sft.optim", cfg.sft.optim, explicit)
    _check_optim("train.optim", cfg.train.optim, explicit)
    if cfg.train.grad_accum_steps < 1:
        raise ConfigError(f"config key 'train.grad_accum_steps' must be >= 1; got {cfg.train.grad_accum_steps}")
    if cfg.train.batch_size % cfg.train.grad_accum_steps:
        raise ConfigError(f"config key 'train.batch_size' ({cfg.train.batch_size}) must be divisible by "
                          f"'train.grad_accum_steps' ({cfg.train.grad_accum_steps}): the micro-batches are equal")
    if cfg.train.weighting_scope not in WEIGHTING_SCOPES:
        raise ConfigError(f"config key 'train.weighting_scope' must be one of {WEIGHTING_SCOPES}; "
                          f"got {cfg.train.weighting_scope!r}")
    report_to_list(cfg.train.report_to, check_installed=True)
    from alignshift.data.encode import KL_PAIRINGS

    if cfg.data.kl_pairing not in KL_PAIRINGS:
        raise ConfigError(f"config key 'data.kl_pairing' must be one of {KL_PAIRINGS}; got {cfg.data.kl_pairing!r}")
    if cfg.data.truncation not in TRUNCATION_POLICIES:
        raise ConfigError(f"config key 'data.truncation' must be one of {TRUNCATION_POLICIES}; "
                          f"got {cfg.data.truncation!r}")
    if cfg.train.length_bucket > 0:
        for i, m in enumerate(cfg.methods):
            if "lists" in BASE_LOSSES[m.base].requires:
                raise ConfigError(f"config key 'train.length_bucket' is {cfg.train.length_bucket}, but "
                                  f"'methods.{i}' ({m.name}) has the listwise base loss {m.base!r}: length "
                                  "bucketing only trims pairwise [B, T] batches, not the [B, K, T] cand_* "
                                  "arrays (set train.length_bucket=0)")
    _validate_packing(cfg)
    uses_ref = [m.name for m in cfg.methods if "reference" in BASE_LOSSES[m.base].requires]
    if not uses_ref:
        free = sorted({m.base for m in cfg.methods})
        if "train.precompute_reference" in explicit and cfg.train.precompute_reference:
            raise ConfigError(f"config key 'train.precompute_reference' is true, but every method's base loss "
                              f"{free} is reference-free: there are no reference log-probs to precompute "
                              "(drop the key or set it to false)")
        if cfg.train.reference_cache_dir:
            raise ConfigError(f"config key 'train.reference_cache_dir' is set, but every method's base loss "
                              f"{free} is reference-free: nothing would be cached")
    n_val = cfg.data.scenario_kwargs.get("n_val") if not cfg.data.dataset else None
    for i, m in enumerate(cfg.methods):
        needs_val = "val_batch" in WEIGHTING_RULES[m.weighting].requires
        if needs_val and n_val is not None and n_val < 1:
            raise ConfigError(f"config key 'methods.{i}.weighting' ({m.name}): {m.weighting!r} needs a "
                              f"deployment/validation set, but 'data.scenario_kwargs.n_val' is {n_val}")
        if m.train_data in ("val", "train+val") and n_val is not None and n_val < 1:
            raise ConfigError(f"config key 'methods.{i}.train_data' ({m.name}) is {m.train_data!r}, but "
                              f"'data.scenario_kwargs.n_val' is {n_val}")
        if cfg.data.dataset and (needs_val or m.train_data in ("val", "train+val")):
            vr = cfg.data.dataset_kwargs.get("val_ratio", None)
            if vr is not None and not vr:
                raise ConfigError(f"config key 'methods.{i}' ({m.name}) needs a validation set, but "
                                  f"'data.dataset_kwargs.val_ratio' is {vr!r}")
