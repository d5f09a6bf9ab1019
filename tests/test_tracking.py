"""``train.report_to``: the training loop's records in TensorBoard event files and W&B offline runs.

The loop runs a tiny jitted least-squares step (no model) with a ``metrics.jsonl`` writer whose
static fields name the seed/phase/method, as the experiment driver's do; the TensorBoard event
files are read back with ``tensorboard``'s EventAccumulator and the W&B offline run's
``run-*.wandb`` log (LevelDB log framing of ``wandb_internal_pb2.Record`` protobufs) with the
small reader below. W&B runs offline (``WANDB_MODE=offline``, ``WANDB_DIR`` in tmp): no network.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from alignshift.config import ConfigError, load_config, report_to_list
from alignshift.data import BatchIterator
from alignshift.train import tracking
from alignshift.train.loop import train_loop
from alignshift.train.metrics import JsonlWriter

CONFIG = {"scenario": "toy", "train": {"steps": 12, "report_to": ["tensorboard", "wandb"]}}


def _toy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32)).astype(np.float32)
    tx = optax.adam(0.1)

    @jax.jit
    def step(state, batch):
        def loss_fn(w):
            return jnp.mean((batch["x"] @ w - batch["y"]) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(state["params"])
        upd, opt = tx.update(g, state["opt_state"], state["params"])
        return ({"params": optax.apply_updates(state["params"], upd), "opt_state": opt},
                {"loss": loss, "grad_norm": optax.tree.norm(g), "rewards/margins": -loss})

    w0 = jnp.zeros(3)
    return step, {"params": w0, "opt_state": tx.init(w0)}, BatchIterator({"x": x, "y": y}, 8, seed=0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Two methods of one seed trained through the loop with TensorBoard + W&B (offline) on."""
    out = tmp_path_factory.mktemp("tracked") / "toy_run"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_DIR", str(out / "wandb_dir"))
    mp.setenv("WANDB_SILENT", "true")
    mp.delenv("WANDB_API_KEY", raising=False)
    try:
        t = tracking.start(["jsonl", "tensorboard", "wandb"], str(out), CONFIG)
        assert t is not None and tracking.active() is t
        histories = {}
        for method in ("dpo", "ipo"):
            step, state, it = _toy()
            with JsonlWriter(str(out / "metrics.jsonl"), static={"scenario": "toy", "seed": 0,
                                                                 "phase": "preference", "method": method}) as w:
                _, histories[method] = train_loop(step, state, it, steps=12, log_every=4, writer=w, progress=False,
                                                  eval_fn=lambda s: {"deploy_pref_acc": 0.5}, eval_every=6)
        tracking.log({"seed": 0, "method": "dpo", "step": 12, "event": "nonfinite_step", "loss": float("nan"),
                      "batch_indices": [1, 2]})  # a fault event: metrics.jsonl only
        tracking.stop()
        assert tracking.active() is None
    finally:
        mp.undo()
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return out, records


def _expected(records, method):
    """{metric: {step: value}} of the metrics.jsonl records of ``method``."""
    want: dict = {}
    for r in records:
        if r["method"] == method:
            for k, v in tracking.scalars(r).items():
                want.setdefault(k, {})[r["step"]] = v
    return want


def test_tensorboard_event_files_hold_the_jsonl_metrics_and_config(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, records = run
    for method in ("dpo", "ipo"):
        d = out / "tensorboard" / "seed_0" / method
        assert glob.glob(str(d / "events.out.tfevents.*")), f"no event file in {d}"
        acc = EventAccumulator(str(d), size_guidance={"scalars": 0, "tensors": 0})
        acc.Reload()
        want = _expected(records, method)
        assert set(acc.Tags()["scalars"]) == set(want) >= {"loss", "grad_norm", "rewards/margins",
                                                              "eval/deploy_pref_acc", "time_s"}
        for tag, by_step in want.items():
            got = {e.step: e.value for e in acc.Scalars(tag)}
            assert got.keys() == by_step.keys(), tag
            np.testing.assert_allclose([got[s] for s in sorted(got)], [by_step[s] for s in sorted(got)],
                                       rtol=1e-6, err_msg=tag)
        assert sorted({e.step for e in acc.Scalars("loss")}) == [4, 8, 12]
        text = [t for t in acc.Tags()["tensors"] if t.startswith("config")]
        assert text, acc.Tags()
        body = acc.Tensors(text[0])[0].tensor_proto.string_val[0].decode()
        cfg = json.loads(body.split("```json\n", 1)[1].rsplit("\n```", 1)[0])
        assert cfg["config"] == CONFIG and cfg["method"] == method and cfg["seed"] == 0


def _wandb_records(path):
    """The ``wandb_internal_pb2.Record``s of an offline ``run-*.wandb`` file: a 7-byte W&B header,
    then LevelDB-log framing (32 KiB blocks; chunk header crc32c:u32, length:u16, type:u8 with
    1 = full, 2 = first, 3 = middle, 4 = last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = open(path, "rb").read()
    assert buf[:4] == b":W&B", buf[:7]
    pos, parts, block = 7, [], 32768
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        pos += 7
        if kind == 0 and n == 0:  # zero padding to the end of the block
            pos += left - 7
            continue
        parts.append(buf[pos:pos + n])
        pos += n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(b"".join(parts))
            parts = []
            yield rec


def test_wandb_offline_runs_hold_the_jsonl_metrics_and_config(run):
    out, records = run
    runs = sorted(glob.glob(str(out / "wandb_dir" / "wandb" / "offline-run-*")))
    assert len(runs) == 2, runs  # one per seed and method, offline (WANDB_MODE), under WANDB_DIR
    seen = {}
    for d in runs:
        (log_file,) = glob.glob(os.path.join(d, "run-*.wandb"))
        history, run_rec = {}, None
        for rec in _wandb_records(log_file):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                run_rec = rec.run
            elif kind == "history":
                row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
                step = row.pop("_step")
                history[step] = {k: v for k, v in row.items() if not k.startswith("_")}
        assert run_rec is not None
        config = {u.key: json.loads(u.value_json) for u in run_rec.config.update if not u.key.startswith("_")}
        method = config["method"]
        assert (run_rec.display_name, run_rec.run_group, run_rec.project) == (f"toy_run/seed_0/{method}", "toy_run",
                                                                              "alignshift")
        assert {k: config[k] for k in CONFIG} == CONFIG and (config["seed"], config["phase"]) == (0, "preference")
        want = _expected(records, method)
        got = {}
        for step, row in history.items():
            for k, v in row.items():
                got.setdefault(k, {})[step] = v
        assert got.keys() == want.keys()
        for k in want:
            assert got[k].keys() == want[k].keys(), k
            np.testing.assert_allclose([got[k][s] for s in sorted(got[k])], [want[k][s] for s in sorted(got[k])],
                                       rtol=1e-6, err_msg=k)
        seen[method] = True
    assert set(seen) == {"dpo", "ipo"}


def test_jsonl_only_starts_no_tracker(tmp_path):
    # (the fixture's fault event, sent at step 12 with loss=nan, reached neither tracker: the
    # TensorBoard and W&B tests above find exactly the metrics.jsonl values at steps 4, 8, 12)
    assert tracking.start("jsonl", str(tmp_path)) is None and tracking.active() is None
    tracking.log({"step": 1, "loss": 1.0})  # no active trackers: nothing happens
    assert not os.listdir(tmp_path)


def test_report_to_config_key():
    assert load_config(None, []).train.report_to == ["jsonl"]
    cfg = load_config(None, ["train.report_to=[jsonl,tensorboard,wandb]"])
    assert report_to_list(cfg.train.report_to) == ["jsonl", "tensorboard", "wandb"]
    assert report_to_list(load_config(None, ["train.report_to=tensorboard"]).train.report_to) == ["tensorboard"]
    assert report_to_list("wandb,tensorboard,wandb") == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match=r"train.report_to.*unknown tracker 'mlflow'"):
        load_config(None, ["train.report_to=[jsonl,mlflow]"])
    with pytest.raises(ConfigError, match=r"train.report_to.*non-empty list"):
        load_config(None, ["train.report_to=[]"])


@pytest.mark.parametrize("name, module, extra", [("tensorboard", "tensorboardX", "tensorboard"),
                                                 ("wandb", "wandb", "wandb")])
def test_missing_tracker_package_names_the_extra(monkeypatch, tmp_path, name, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if it were not installed
    monkeypatch.setattr("importlib.util.find_spec", lambda m, *a: None if m == module else object())
    want = rf"train.report_to.*{name!r}.*{module!r} is not installed: pip install 'alignshift\[{extra}\]'"
    with pytest.raises(ConfigError, match=want):
        load_config(None, [f"train.report_to={name}"])
    with pytest.raises(ConfigError, match=want):
        tracking.Tracking([name], str(tmp_path))


def test_wandb_is_offline_unless_logged_in(monkeypatch, tmp_path):
    netrc = tmp_path / "netrc"
    netrc.write_text("")
    monkeypatch.setenv("NETRC", str(netrc))
    for k in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(k, raising=False)
    assert tracking.wandb_mode() == "offline"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password 0123456789abcdef\n")
    assert tracking.wandb_mode() == "online"  # `wandb login` writes this entry
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert tracking.wandb_mode() == "disabled"  # the user's explicit choice wins
    monkeypatch.delenv("WANDB_MODE")
    netrc.write_text("")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert tracking.wandb_mode() == "online"
