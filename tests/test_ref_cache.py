"""On-disk reference log-prob cache: hits, stale-key detection, corruption, atomic writes."""

import json
import os
import re
import shutil
import warnings

import jax
import numpy as np
import pytest

from alignshift.config import load_config
from alignshift.data import encode_pairs, make_scenario
from alignshift.train import ref_cache as rc
from alignshift.train.ref_cache import ReferenceCacheWarning, ReferenceLogpCache, cache_key, key_components
from alignshift.train.phases import build_policy, precompute_reference_logps
from alignshift.forward import make_logits_fn, split_model

REF_KEYS = ["reference_chosen_logps", "reference_kl_logps", "reference_rejected_logps"]


@pytest.fixture(scope="module")
def env():
    cfg = load_config(None, ["model.hidden_size=32", "model.num_attention_heads=2", "model.num_key_value_heads=1"])
    data = make_scenario("deploy_shift", seed=0, n_train=32, n_test=8, n_sft=8)
    model = build_policy(cfg.model, data.tokenizer, seed=0)
    graphdef, params, rest = split_model(model)
    extra = {"tokenizer": "shiftbench-word", "max_prompt_len": cfg.data.max_prompt_len,
             "max_completion_len": cfg.data.max_completion_len, "model": "tiny-llama-32"}
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=cfg.data.max_prompt_len,
                          max_completion_len=cfg.data.max_completion_len)
    return make_logits_fn(graphdef, rest), params, arrays, extra


@pytest.fixture(scope="module")
def template(env, tmp_path_factory):
    """A directory holding one valid entry for ``env`` (copied by tests that corrupt it)."""
    logits_fn, params, arrays, extra = env
    d = tmp_path_factory.mktemp("template")
    out = ReferenceLogpCache(str(d)).get_or_compute(arrays, params, Counter(logits_fn, params), extra=extra)
    return d, out


def _seed_from(template, tmp_path):
    for name in os.listdir(template[0]):
        shutil.copy(template[0] / name, tmp_path / name)
    return template[1]


class Counter:
    """compute_fn = precompute_reference_logps with ``params``, counting calls."""

    def __init__(self, logits_fn, params):
        self.logits_fn, self.params, self.calls = logits_fn, params, 0

    def __call__(self, arrays):
        self.calls += 1
        return precompute_reference_logps(self.logits_fn, self.params, arrays, batch_size=32)


def _files(d):
    return sorted(os.listdir(d))


def _bytes_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].tobytes() == b[k].tobytes(), k


def test_miss_then_hit_bit_identical(env, tmp_path):
    logits_fn, params, arrays, extra = env
    f = Counter(logits_fn, params)
    cache = ReferenceLogpCache(str(tmp_path))
    first = cache.get_or_compute(arrays, params, f, extra=extra)
    assert cache.last_hit is False and f.calls == 1 and cache.last_reason == "miss"
    key = cache.last_key
    assert key == cache_key(arrays, params, extra=extra)
    assert _files(tmp_path) == [key + ".json", key + ".npz"]
    man = json.load(open(tmp_path / (key + ".json")))
    assert man["key"] == key and man["n"] == 32 and man["extra"] == extra
    assert sorted(man["arrays"]) == REF_KEYS and man["arrays"]["reference_chosen_logps"]["shape"] == [32]
    assert man["components"]["weights"].startswith("sha256:") and "created" in man

    # a new run (fresh cache object, arrays re-encoded as copies, extra in another order) hits
    cache2 = ReferenceLogpCache(str(tmp_path))
    again = cache2.get_or_compute({k: v.copy() for k, v in reversed(list(arrays.items()))}, params, f,
                                  extra=dict(reversed(list(extra.items()))), expected_keys=REF_KEYS)
    assert cache2.last_hit is True and f.calls == 1 and cache2.stats == {"hits": 1, "misses": 0, "rebuilds": 0}
    fresh = precompute_reference_logps(logits_fn, params, arrays, batch_size=32)
    _bytes_equal(again, fresh)
    _bytes_equal(again, first)
    assert _files(tmp_path) == [key + ".json", key + ".npz"]


def _perturb_first_leaf(params, delta=1e-3):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    leaves = [x.copy() for x in leaves]
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].add(delta)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def test_stale_inputs_change_key_and_recompute(env, tmp_path):
    logits_fn, params, arrays, extra = env
    cache = ReferenceLogpCache(str(tmp_path))
    f = Counter(logits_fn, params)
    base = cache.get_or_compute(arrays, params, f, extra=extra)
    keys = {cache.last_key}

    tok = {k: v.copy() for k, v in arrays.items()}
    j = int(np.argmax(tok["rejected_loss_mask"][5]))
    tok["rejected_input_ids"][5, j] = (tok["rejected_input_ids"][5, j] + 1) % 50 + 4  # one token
    mask = {k: v.copy() for k, v in arrays.items()}
    mask["kl_loss_mask"][3, int(np.argmax(mask["kl_loss_mask"][3]))] = 0  # one mask bit
    cases = [("token", tok, params, extra), ("mask", mask, params, extra),
             ("max_len", arrays, params, {**extra, "max_completion_len": extra["max_completion_len"] + 1}),
             ("weight", arrays, _perturb_first_leaf(params), extra)]
    for name, a, p, e in cases:
        g = Counter(logits_fn, p)
        out = cache.get_or_compute(a, p, g, extra=e)
        assert cache.last_hit is False and g.calls == 1, name
        assert cache.last_key not in keys, name
        keys.add(cache.last_key)
        if name == "weight":
            _bytes_equal(out, precompute_reference_logps(logits_fn, p, a, batch_size=32))
            assert not np.array_equal(out["reference_chosen_logps"], base["reference_chosen_logps"])
    # the changed inputs really change the log-probs (so a stale hit would have been wrong)
    tok_out = cache.get_or_compute(tok, params, f, extra=extra)
    assert not np.array_equal(tok_out["reference_rejected_logps"], base["reference_rejected_logps"])
    assert len(keys) == 5 and len(_files(tmp_path)) == 10
    # and the original entry is still a hit
    cache.get_or_compute(arrays, params, f, extra=extra)
    assert cache.last_hit and f.calls == 1


def test_key_sensitivity_and_invariance(env):
    _, params, arrays, extra = env
    k0 = cache_key(arrays, params, extra=extra)
    # ignored: prompt_* arrays, reference_* arrays, dict order
    no_prompt = {k: v for k, v in arrays.items() if not k.startswith("prompt_")}
    with_ref = {**arrays, "reference_chosen_logps": np.zeros(32, np.float32)}
    assert cache_key(no_prompt, params, extra=extra) == k0 == cache_key(with_ref, params, extra=extra)
    # dtype, shape, one element of any weight leaf (last leaf too), weights dtype
    assert cache_key({**arrays, "chosen_input_ids": arrays["chosen_input_ids"].astype(np.int64)}, params,
                     extra=extra) != k0
    assert cache_key({k: v[:31] for k, v in arrays.items()}, params, extra=extra) != k0
    leaves, td = jax.tree_util.tree_flatten(params)
    last = leaves[:-1] + [leaves[-1].at[(-1,) * leaves[-1].ndim].multiply(1.0 + 2 ** -10)]
    assert cache_key(arrays, jax.tree_util.tree_unflatten(td, last), extra=extra) != k0
    bf16 = jax.tree_util.tree_map(lambda x: x.astype("bfloat16").astype("float32"), params)
    assert cache_key(arrays, bf16, extra=extra) != k0
    # weights_id replaces the weight hash (params are not read)
    kid = cache_key(arrays, None, extra=extra, weights_id="ckpt-A")
    assert kid != k0 and kid == cache_key(arrays, params, extra=extra, weights_id="ckpt-A")
    assert kid != cache_key(arrays, None, extra=extra, weights_id="ckpt-B")
    with pytest.raises(TypeError):
        cache_key(arrays, params, extra={"obj": object()})


def test_weights_id_from_files(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "config.json").write_text("{}")
    a = rc.weights_id_from_files(str(tmp_path))
    assert a == rc.weights_id_from_files(str(tmp_path)) and "model.safetensors" in a
    (tmp_path / "model.safetensors").write_bytes(b"x" * 11)
    assert rc.weights_id_from_files(str(tmp_path)) != a
    with pytest.raises(FileNotFoundError):
        rc.weights_id_from_files(str(tmp_path / "nope"))


def _corrupt_truncate(npz, man):
    data = open(npz, "rb").read()
    open(npz, "wb").write(data[: len(data) // 2])


def _corrupt_flip_byte(npz, man):
    data = bytearray(open(npz, "rb").read())
    data[-200] ^= 0x01  # inside the zip central directory / last array, size unchanged
    open(npz, "wb").write(bytes(data))


def _corrupt_no_manifest(npz, man):
    os.remove(man)


def _corrupt_no_npz(npz, man):
    os.remove(npz)


def _corrupt_bad_json(npz, man):
    open(man, "w").write("{not json")


def _corrupt_manifest_n(npz, man):
    m = json.load(open(man))
    m["n"] = 31
    json.dump(m, open(man, "w"))


@pytest.mark.parametrize("corrupt,reason", [
    (_corrupt_truncate, "sha256 differs"), (_corrupt_flip_byte, "sha256 differs"),
    (_corrupt_no_manifest, "manifest missing"), (_corrupt_no_npz, "npz missing"),
    (_corrupt_bad_json, "unreadable manifest"), (_corrupt_manifest_n, "N=31"),
])
def test_corrupt_entry_detected_and_rebuilt(env, template, tmp_path, corrupt, reason):
    logits_fn, params, arrays, extra = env
    first = _seed_from(template, tmp_path)
    cache = ReferenceLogpCache(str(tmp_path))
    f = Counter(logits_fn, params)
    npz, man = cache.paths(cache_key(arrays, params, extra=extra))
    corrupt(npz, man)
    with pytest.warns(ReferenceCacheWarning, match=re.escape(npz) + r".*" + re.escape(reason)):
        out = cache.get_or_compute(arrays, params, f, extra=extra)
    assert cache.last_hit is False and f.calls == 1 and reason in cache.last_reason
    assert cache.stats["rebuilds"] == 1
    _bytes_equal(out, first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cache.get_or_compute(arrays, params, f, extra=extra)  # rebuilt entry is valid
    assert cache.last_hit is True and f.calls == 1


@pytest.mark.parametrize("bad,reason", [
    (lambda o: {**o, "reference_chosen_logps": np.where(np.arange(32) == 7, np.nan, o["reference_chosen_logps"])},
     "non-finite"),
    (lambda o: {k: v[:-1] for k, v in o.items()}, "expected (32,)"),
    (lambda o: {k: v for k, v in o.items() if k != "reference_kl_logps"}, "expected ["),
    (lambda o: {**o, "reference_chosen_logps": o["reference_chosen_logps"].astype(np.int32)}, "not floating"),
])
def test_self_consistent_but_invalid_entry_rejected(env, template, tmp_path, bad, reason):
    """Entries whose manifest matches their npz but whose content is unusable are rejected."""
    logits_fn, params, arrays, extra = env
    good = template[1]
    cache = ReferenceLogpCache(str(tmp_path))
    f = Counter(logits_fn, params)
    comp = key_components(arrays, params, extra=extra)
    cache._store(cache_key(arrays, params, extra=extra), comp, 32, bad(good), 0.0)  # consistent sha256s
    with pytest.warns(ReferenceCacheWarning, match=re.escape(reason)):
        out = cache.get_or_compute(arrays, params, f, extra=extra, expected_keys=REF_KEYS)
    assert cache.last_hit is False and f.calls == 1
    _bytes_equal(out, good)


def test_compute_crash_leaves_nothing(env, tmp_path):
    _, params, arrays, extra = env
    cache = ReferenceLogpCache(str(tmp_path))

    def boom(a):
        raise RuntimeError("OOM in reference forward")

    with pytest.raises(RuntimeError, match="OOM"):
        cache.get_or_compute(arrays, params, boom, extra=extra)
    assert _files(tmp_path) == []


def test_crash_during_write_is_atomic(env, tmp_path, monkeypatch):
    logits_fn, params, arrays, extra = env
    cache = ReferenceLogpCache(str(tmp_path))
    f = Counter(logits_fn, params)
    real_fsync = os.fsync
    monkeypatch.setattr(rc.os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # dies while writing the npz
        cache.get_or_compute(arrays, params, f, extra=extra)
    assert _files(tmp_path) == []  # no temp file, no partial npz

    calls = {"n": 0}

    def fsync_second_fails(fd):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("killed")
        real_fsync(fd)

    monkeypatch.setattr(rc.os, "fsync", fsync_second_fails)
    with pytest.raises(OSError, match="killed"):  # npz written, dies while writing the manifest
        cache.get_or_compute(arrays, params, f, extra=extra)
    key = cache.last_key
    assert _files(tmp_path) == [key + ".npz"]
    monkeypatch.setattr(rc.os, "fsync", real_fsync)
    with pytest.warns(ReferenceCacheWarning, match="manifest missing"):
        cache.get_or_compute(arrays, params, f, extra=extra)
    assert _files(tmp_path) == [key + ".json", key + ".npz"] and f.calls == 3
    cache.get_or_compute(arrays, params, f, extra=extra)
    assert cache.last_hit and f.calls == 3


def test_nonfinite_result_not_cached(env, tmp_path):
    _, params, arrays, extra = env
    cache = ReferenceLogpCache(str(tmp_path))
    with pytest.warns(ReferenceCacheWarning, match="not cached"):
        out = cache.get_or_compute(arrays, params,
                                   lambda a: {"reference_chosen_logps": np.full(32, np.inf, np.float32)}, extra=extra)
    assert np.isinf(out["reference_chosen_logps"]).all() and _files(tmp_path) == []
