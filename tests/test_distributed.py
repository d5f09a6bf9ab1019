"""Two processes under ``jax.distributed`` form one global mesh and take the same DPO steps as
one process with the same number of devices.

Three CPU workers (this file run as a script), all bounded by a timeout and on the loopback
interface only:

* ``dist`` × 2: ``JAX_COORDINATOR_ADDRESS=127.0.0.1:<free port>``, ``JAX_NUM_PROCESSES=2``,
  ``JAX_PROCESS_ID=0/1`` and 2 CPU devices each; they call
  :func:`alignshift.parallel.maybe_initialize_distributed` (the launch scripts' entry point),
  build one ``(data=2, fsdp=2, tensor=1)`` mesh over the 4 global devices, feed each its own
  half of every batch (:func:`alignshift.parallel.shard_batch`) and take 2 sharded DPO steps
  (JAX's CPU cross-process collectives: gloo, JAX 0.10's default);
* ``single``: one process with 4 CPU devices, the same mesh shape, the whole batches.

Each writes a JSON report (process 0 of the pair gathers the final parameters with
``multihost_utils.process_allgather``); the tests compare them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240
N_LOCAL = 2  # CPU devices per distributed process
N_PROC = 2


# --------------------------------------------------------------------------- worker (subprocess)


def _worker(mode: str, out_path: str) -> None:
    from alignshift.parallel import maybe_initialize_distributed

    initialised = maybe_initialize_distributed(initialization_timeout=120) if mode == "dist" else False

    import jax
    import jax.numpy as jnp
    from jax.experimental import multihost_utils

    from alignshift.config import MethodConfig, OptimConfig, load_config
    from alignshift.data import encode_pairs, make_scenario
    from alignshift.forward import split_model
    from alignshift.parallel import make_mesh, make_sharded_step, param_path, place_state, shard_batch, shard_params
    from alignshift.train.optim import make_optimizer
    from alignshift.train.phases import build_policy, objective_for
    from alignshift.train.steps import init_state, make_preference_step

    report: dict = {
        "mode": mode,
        "initialised": initialised,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_device_count": jax.local_device_count(),
    }
    cfg = load_config(None, [
        "model.hidden_size=32", "model.intermediate_size=64", "model.num_attention_heads=2",
        "model.num_key_value_heads=1", "model.num_hidden_layers=1",
        "data.scenario_kwargs={n_train: 16, n_test: 8, n_sft: 8}",
    ])
    data = make_scenario("deploy_shift", seed=0, **cfg.data.scenario_kwargs)
    model = build_policy(cfg.model, data.tokenizer, seed=0)  # same seed: same weights in every process
    graphdef, params, rest = split_model(model)
    arrays = encode_pairs(data.tokenizer, data.train, max_prompt_len=cfg.data.max_prompt_len,
                          max_completion_len=cfg.data.max_completion_len)
    keys = [k for k in arrays if k.startswith(("chosen_", "rejected_"))]
    batches = [{k: np.asarray(arrays[k][i * 8:(i + 1) * 8]) for k in keys} for i in range(2)]  # 8 pairs each

    # see tests/test_parallel.py: no warm-up, so step 2 moves; Adam eps 1e-4 keeps rounding
    # differences of reductions from turning into O(lr) parameter differences
    tx = make_optimizer(OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.01, eps=1e-4), 10)
    step = make_preference_step(graphdef, rest, tx, objective_for(MethodConfig()))

    mesh = make_mesh(data=2, fsdp=2, tensor=1)  # over jax.devices(): every process's devices
    report["mesh_shape"] = dict(mesh.shape)
    report["mesh_processes"] = sorted({d.process_index for d in mesh.devices.flat})
    # the step donates the state: it must not share buffers with the reference
    state = place_state(init_state(jax.tree_util.tree_map(jnp.copy, params), tx), mesh)
    ref = shard_params(params, mesh)

    def local_rows(b):
        # each process feeds its own rows; the global batch is their concatenation in process order
        n = len(next(iter(b.values()))) // jax.process_count()
        lo = jax.process_index() * n
        return {k: v[lo:lo + n] for k, v in b.items()}

    sstep = make_sharded_step(step, state, batches[0], mesh, ref)
    losses, grad_norms = [], []
    for b in batches:
        state, m = sstep(state, shard_batch(local_rows(b), mesh), ref)
        losses.append(float(m["loss"]))
        grad_norms.append(float(m["grad_norm"]))
    report["losses"], report["grad_norms"] = losses, grad_norms
    gathered = multihost_utils.process_allgather(state["params"], tiled=True)  # global values on every process
    flat = {param_path(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(gathered)}
    np.savez(out_path + ".npz", **flat)
    report["n_params"] = len(flat)
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    if mode == "dist":
        multihost_utils.sync_global_devices("alignshift-test-done")  # neither exits while the other still needs it


# --------------------------------------------------------------------------- pytest side


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(n_devices: int, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_", "OMPI_",
                                "TPU_WORKER", "MEGASCALE"))}
    # the same cheap CPU compile settings in every worker (compiling dominates this test's time)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_devices}"
                        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("distributed")
    port = _free_port()
    me = os.path.abspath(__file__)
    procs = {}
    for i in range(N_PROC):
        env = _env(N_LOCAL, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(N_PROC),
                   JAX_PROCESS_ID=str(i))
        procs[f"dist{i}"] = subprocess.Popen([sys.executable, me, "dist", str(d / f"dist{i}.json")], cwd=ROOT, env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    procs["single"] = subprocess.Popen([sys.executable, me, "single", str(d / "single.json")], cwd=ROOT,
                                       env=_env(N_LOCAL * N_PROC), stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT_S
    outputs, failed = {}, []
    try:
        for name, p in procs.items():
            try:
                outputs[name], _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed.append(f"{name}: timed out after {TIMEOUT_S}s")
                continue
            if p.returncode != 0:
                failed.append(f"{name}: exit status {p.returncode}")
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    if failed:
        logs = "\n".join(f"--- {n}:\n{(outputs.get(n) or '')[-3000:]}" for n in procs)
        pytest.fail("; ".join(failed) + "\n" + logs)
    out = {}
    for name in procs:
        out[name] = json.loads((d / f"{name}.json").read_text())
        out[name]["params"] = dict(np.load(d / f"{name}.json.npz"))
    return out


def test_two_processes_see_one_global_mesh(reports):
    for i in range(N_PROC):
        r = reports[f"dist{i}"]
        assert r["initialised"] is True
        assert (r["process_index"], r["process_count"]) == (i, N_PROC)
        assert (r["local_device_count"], r["device_count"]) == (N_LOCAL, N_LOCAL * N_PROC)
        assert r["mesh_shape"] == {"data": 2, "fsdp": 2, "tensor": 1}
        assert r["mesh_processes"] == [0, 1]  # the mesh spans both processes' devices
    s = reports["single"]
    assert (s["initialised"], s["process_count"], s["device_count"]) == (False, 1, N_LOCAL * N_PROC)


def test_two_processes_take_the_same_dpo_steps_as_one(reports):
    single, d0, d1 = reports["single"], reports["dist0"], reports["dist1"]
    assert abs(single["losses"][0] - np.log(2.0)) < 1e-6  # policy = reference at step 1
    assert abs(single["losses"][1] - single["losses"][0]) > 1e-4, "step 2 did not move: weak test"
    for r in (d0, d1):  # metrics are global: both processes report the same values
        np.testing.assert_allclose(r["losses"], single["losses"], rtol=1e-5)
        np.testing.assert_allclose(r["grad_norms"], single["grad_norms"], rtol=1e-5)
    a = single["params"]
    assert a.keys() == d0["params"].keys() == d1["params"].keys() and len(a) == single["n_params"] > 0
    for k in a:
        for r in (d0, d1):
            np.testing.assert_allclose(r["params"][k], a[k], rtol=1e-5, atol=1e-7, err_msg=k)


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
