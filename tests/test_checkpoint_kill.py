"""Interrupted runs, in real subprocesses: a SIGKILL during a checkpoint save leaves the previous
checkpoint restorable; a SIGTERM (preemption) makes the loop save a final checkpoint and exit
with status 143, and resuming from it continues with bit-identical losses."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}

# A toy model for loop-level tests: linear regression, guarded AdamW, a jitted donating step.
TOY = textwrap.dedent(
    """
    from functools import partial
    import jax, jax.numpy as jnp, numpy as np, optax
    from alignshift.config import OptimConfig
    from alignshift.data import BatchIterator
    from alignshift.train.optim import make_optimizer

    def make_toy(total_steps, n=256, seed=0):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(n, 4)).astype(np.float32)
        y = (x @ np.array([1.0, -2.0, 0.5, 3.0], np.float32) + 0.1 * rng.normal(size=n)).astype(np.float32)
        tx = make_optimizer(OptimConfig(lr=1e-2, warmup_steps=2), total_steps)

        @partial(jax.jit, donate_argnums=0)
        def step(state, batch):
            loss, g = jax.value_and_grad(lambda w: jnp.mean((batch["x"] @ w - batch["y"]) ** 2))(state["params"])
            upd, opt = tx.update(g, state["opt_state"], state["params"], value=loss)
            new = {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], upd), "opt_state": opt}
            return new, {"loss": loss, "grad_norm": optax.tree.norm(g)}

        w0 = jnp.zeros(4, jnp.float32)
        state = {"step": jnp.zeros((), jnp.int32), "params": w0, "opt_state": tx.init(w0)}
        return step, state, BatchIterator({"x": x, "y": y}, 8, seed=seed)
    """
)


def _toy_module(tmp_path):
    (tmp_path / "_toy.py").write_text(TOY)
    sys.path.insert(0, str(tmp_path))
    import importlib

    import _toy

    return importlib.reload(_toy)

# Child: save step 1 (committed), then die by SIGKILL inside the save of step 2.
#  finalize: every array of step 2 is written; the process kills itself in orbax's commit
#            (just before the rename of the temporary directory), deterministically;
#  external: the parent kills it at an arbitrary moment while it keeps saving large states.
KILL_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    from alignshift.train.checkpoint import Checkpointer

    mode, d = sys.argv[1], sys.argv[2]
    ck = Checkpointer(d, max_to_keep=2)
    def state(k, n):
        return {"step": np.array(k, np.int32), "params": {"w": np.full((n,), float(k), np.float32)}}
    ck.save(1, state(1, 1000), {"step": 1, "iterator": {"step": 7}})
    if mode == "finalize":
        from orbax.checkpoint._src.path import atomicity
        async def die(self, *a, **k):
            os.kill(os.getpid(), signal.SIGKILL)
        atomicity.AtomicRenameTemporaryPath.finalize = die
        ck.save(2, state(2, 1000), {"step": 2, "iterator": {"step": 14}})
        print("UNREACHABLE", flush=True)
    else:
        print("SAVING", flush=True)
        k = 2
        while True:  # ~32 MB per save; the parent kills us somewhere in here
            ck.save(k, state(k, 8_000_000), {"step": k, "iterator": {"step": 7 * k}})
            k += 1
    """
)


def _restorable(d):
    from alignshift.train.checkpoint import Checkpointer

    ck = Checkpointer(d, max_to_keep=2)
    step = ck.latest_step()
    n = 1000 if step == 1 else 8_000_000
    like = {"step": np.array(0, np.int32), "params": {"w": np.zeros((n,), np.float32)}}
    state, meta = ck.restore(like)
    return ck, step, state, meta


@pytest.mark.parametrize("mode", ["finalize", "external"])
def test_sigkill_during_save_leaves_previous_checkpoint(tmp_path, mode):
    d = str(tmp_path / "ck")
    p = subprocess.Popen([sys.executable, "-c", KILL_CHILD, mode, d], env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    if mode == "external":
        assert p.stdout.readline().strip() == "SAVING"
        t_end = time.time() + 30
        # kill while a save is in progress: as soon as a temporary directory appears
        while time.time() < t_end and not any("tmp" in n for n in os.listdir(d)):
            time.sleep(0.005)
        time.sleep(0.02)
        p.send_signal(signal.SIGKILL)
    out, err = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, (p.returncode, out, err[-2000:])
    assert "UNREACHABLE" not in out
    leftovers = [n for n in os.listdir(d) if "tmp" in n]
    if mode == "finalize":
        assert leftovers, "the killed save should have left its temporary directory behind"
    ck, step, state, meta = _restorable(d)
    # the latest committed checkpoint is complete and exactly what was saved
    assert step >= 1 and int(meta["step"]) == step and meta["iterator"]["step"] == 7 * step
    assert int(state["step"]) == step
    np.testing.assert_array_equal(state["params"]["w"], np.full_like(state["params"]["w"], float(step)))
    if mode == "finalize":
        assert step == 1
    assert not [n for n in os.listdir(d) if "tmp" in n]  # reopening cleaned the partial save up
    # and the directory is usable again
    ck.save(step + 1, {"step": np.array(step + 1, np.int32), "params": {"w": np.zeros((3,), np.float32)}}, {"step": step + 1})
    assert ck.latest_step() == step + 1
    ck.close()


# Child: a toy regression trained by train_loop with a checkpointer; each step sleeps a little
# so the parent can SIGTERM it mid-run. Writes metrics to <d>/m.jsonl.
TERM_CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from _toy import make_toy
    from alignshift.train.checkpoint import Checkpointer
    from alignshift.train.loop import train_loop
    from alignshift.train.metrics import JsonlWriter

    d = sys.argv[1]
    step, state, it = make_toy(total_steps=400)
    def slow(state, batch):
        time.sleep(0.02)
        return step(state, batch)
    with JsonlWriter(d + "/m.jsonl") as w:
        train_loop(slow, state, it, steps=400, log_every=3, writer=w, checkpointer=Checkpointer(d + "/ck"),
                   checkpoint_every=0, progress=False)
    print("FINISHED", flush=True)
    """
)


def test_sigterm_saves_a_final_checkpoint_and_resume_is_bit_identical(tmp_path):
    make_toy = _toy_module(tmp_path).make_toy

    from alignshift.train.checkpoint import Checkpointer
    from alignshift.train.loop import train_loop

    d = str(tmp_path)
    p = subprocess.Popen([sys.executable, "-c", TERM_CHILD, d, d], env=ENV,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    m = tmp_path / "m.jsonl"
    t_end = time.time() + 60
    while time.time() < t_end and (not m.exists() or len(m.read_text().splitlines()) < 2):
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, out, err[-2000:])
    assert "FINISHED" not in out
    ck = Checkpointer(str(tmp_path / "ck"))
    stopped = ck.latest_step()
    assert stopped is not None and 6 <= stopped < 400
    before = [json.loads(x) for x in m.read_text().splitlines()]
    assert before[-1]["step"] <= stopped

    # resume in this process for a few more steps; compare with an uninterrupted run
    total = stopped + 7
    step, state, it = make_toy(total_steps=400)
    _, resumed = train_loop(step, state, it, steps=total, log_every=3, checkpointer=ck, progress=False)
    ck.close()
    step, state, it = make_toy(total_steps=400)
    _, full = train_loop(step, state, it, steps=total, log_every=3, progress=False)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "time_s"} for r in rs]  # noqa: E731
    assert strip(before + resumed) == strip(full)  # same records, same bits
