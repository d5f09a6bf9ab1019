import pytest

from alignshift.config import ConfigError, ExperimentConfig, apply_overrides, load_config


def test_defaults_and_overrides():
    cfg = load_config(None, ["train.optim.lr=2e-4", "methods.0.base_kwargs.beta=0.3", "model.dtype=bfloat16"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.train.optim.lr == pytest.approx(2e-4)
    assert cfg.methods[0].base_kwargs == {"beta": 0.3}
    assert cfg.model.dtype == "bfloat16"


@pytest.mark.parametrize(
    "override, msg",
    [
        ("train.lrr=1", r"unknown config key 'train.lrr'"),
        ("train.optim.lrr=1", r"did you mean 'train.optim.lr'"),
        ("train.steps=abc", r"'train.steps' must be an int"),
        ("train.steps=0", r"'train.steps' must be positive"),
        ("methods.0.base=dpoo", r"methods.0.*unknown base loss 'dpoo'"),
        ("methods.0.base_kwargs.betta=1", r"unknown hyper-parameter\(s\) \['betta'\]"),
        ("methods.3.base=dpo", r"not a valid list index"),
        ("model.dtype=float16", r"float32 or bfloat16"),
        ("train.length_bucket=-1", r"'train.length_bucket' must be >= 0"),
        ("train.length_bucket=1.5", r"'train.length_bucket' must be an int"),
        ("noequals", r"key=value"),
        ("methods.0.penalty_gradient={mode: fd}", r"'methods.0.penalty_gradient'.*unknown penalty gradient mode"),
        ("methods.0.penalty_gradient={mode: finite_difference}", r"'methods.0.penalty_gradient'.*has no penalty"),
        ("methods.0.penalty_gradient={pairs: 2}", r"'methods.0.penalty_gradient'.*needs mode="),
    ],
)
def test_bad_config_names_the_key(override, msg):
    with pytest.raises(ConfigError, match=msg):
        load_config(None, [override])


def test_length_bucket_is_refused_with_listwise_methods():
    cfg = load_config(None, ["train.length_bucket=64"])
    assert cfg.train.length_bucket == 64 and load_config(None).train.length_bucket == 0
    with pytest.raises(ConfigError, match=r"'train.length_bucket'.*'methods.0' \(pl\).*listwise"):
        load_config(None, ["train.length_bucket=64", "methods.0.name=pl", "methods.0.base=pl"])
    load_config(None, ["train.length_bucket=0", "methods.0.name=pl", "methods.0.base=pl"])  # off: fine


def test_yaml_file_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {stepz: 3}\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.stepz' \(did you mean 'train.steps'\?\)"):
        load_config(str(p))
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_quick_overrides_apply_before_cli(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {steps: 100}\nquick: {train.steps: 5, seeds: 1}\nseeds: 3\n")
    assert load_config(str(p)).train.steps == 100
    q = load_config(str(p), quick=True)
    assert (q.train.steps, q.seeds) == (5, 1)
    assert load_config(str(p), ["train.steps=7"], quick=True).train.steps == 7


def test_apply_overrides_does_not_mutate():
    d = {"a": {"b": 1}}
    out = apply_overrides(d, ["a.b=2", "a.c=[1, 2]"])
    assert d == {"a": {"b": 1}} and out == {"a": {"b": 2, "c": [1, 2]}}


def test_kl_pairing_key():
    from alignshift.config import ConfigError, load_config

    assert load_config(None, []).data.kl_pairing == "trl"
    assert load_config(None, ["data.kl_pairing=previous_chosen"]).data.kl_pairing == "previous_chosen"
    with pytest.raises(ConfigError, match="data.kl_pairing"):
        load_config(None, ["data.kl_pairing=next"])
