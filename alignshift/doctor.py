"""``python -m alignshift.doctor``: what JAX sees on this machine, before a long run.

Prints the versions (alignshift, Python, jax, jaxlib, flax, optax and any accelerator plugin:
``jax-cuda12-plugin``, ``jax-cuda13-plugin``, ``libtpu``), the backend and its devices, the
memory of each device (``memory_stats()`` on GPU/TPU; the host's RAM on the CPU), whether cuDNN
attention (``jax.nn.dot_product_attention(implementation="cudnn")``) runs (checked on a GPU only),
the environment variables that steer JAX, and the multi-process launcher this environment
describes (:func:`alignshift.parallel.multi_process_env`).

``--distributed`` first calls :func:`alignshift.parallel.maybe_initialize_distributed`, as the
experiment scripts do, then prints this process's index, the process count and the global
device count: run it with the launch recipe of ``scripts/`` to check that every host joins.
``--json FILE`` also writes the report as JSON. Exit status 0 unless ``--require`` names a
backend (``gpu``, ``tpu``, ``cpu``) that is not the one JAX picked (then 1).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys

__all__ = ["report", "format_report", "main"]

PACKAGES = ("jax", "jaxlib", "flax", "optax", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
            "jax-cuda13-pjrt", "libtpu", "nvidia-cudnn-cu12", "nvidia-cudnn-cu13")
ENV_VARS = ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
            "CUDA_VISIBLE_DEVICES", "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
            "SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "TPU_WORKER_HOSTNAMES", "TPU_WORKER_ID")


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _gib(n) -> float | None:
    return None if n is None else round(float(n) / 2**30, 2)


def _host_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _device_memory(d) -> dict:
    try:
        stats = d.memory_stats() or {}
    except Exception:  # not every backend implements it
        stats = {}
    return {"limit_gib": _gib(stats.get("bytes_limit")), "in_use_gib": _gib(stats.get("bytes_in_use")),
            "peak_gib": _gib(stats.get("peak_bytes_in_use"))}


def _cudnn_attention(backend: str) -> dict:
    """Run a small cuDNN flash attention (bf16, causal) on a GPU; elsewhere: not applicable."""
    if backend != "gpu":
        return {"available": None, "detail": f"not checked: needs a GPU (backend is {backend})"}
    import jax
    import jax.numpy as jnp

    try:
        q = jax.random.normal(jax.random.PRNGKey(0), (2, 128, 4, 64), jnp.bfloat16)
        out = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn")
        ref = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="xla")
        err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref.astype(jnp.float32))))
        detail = f"ran a [2, 128, 4, 64] bf16 causal attention; max |cudnn - xla| = {err:.3g}"
        return {"available": err < 0.1, "detail": detail}
    except Exception as e:  # the reason is the report
        return {"available": False, "detail": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _cudnn_version() -> str | None:
    try:
        from jax._src.lib import cuda_versions  # private: best effort only

        v = cuda_versions.cudnn_get_version() if cuda_versions is not None else None
        return None if v is None else f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    except Exception:
        return None


def report(*, distributed: bool = False) -> dict:
    """The report as a dict (``--distributed``: after ``maybe_initialize_distributed``)."""
    from alignshift import __version__
    from alignshift.parallel import maybe_initialize_distributed, multi_process_env

    launcher = multi_process_env()
    initialised = maybe_initialize_distributed() if distributed else False

    import jax

    backend = jax.default_backend()
    devices = jax.devices()
    local = jax.local_devices()
    rep = {
        "alignshift": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": {p: v for p in PACKAGES if (v := _version(p)) is not None},
        "backend": backend,
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "launcher": launcher,
        "distributed_initialised": initialised,
        "device_count": len(devices),
        "local_device_count": len(local),
        "devices": [{"id": d.id, "kind": d.device_kind, "platform": d.platform, "process_index": d.process_index,
                     **_device_memory(d)} for d in local],
        "host_memory_gib": _gib(_host_memory_bytes()),
        "cudnn_attention": _cudnn_attention(backend),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }
    if backend == "gpu":
        rep["cudnn_version"] = _cudnn_version()
    return rep


def format_report(rep: dict) -> str:
    pk = rep["packages"]
    lines = [
        f"alignshift {rep['alignshift']}  python {rep['python']}  {rep['platform']}",
        "packages: " + "  ".join(f"{k} {v}" for k, v in pk.items()),
        f"backend: {rep['backend']}  devices: {rep['device_count']} "
        f"({rep['local_device_count']} local)  process {rep['process_index']} of {rep['process_count']}",
    ]
    for d in rep["devices"]:
        mem = (f"{d['limit_gib']} GiB" + (f" ({d['in_use_gib']} GiB in use)" if d["in_use_gib"] is not None else "")
               if d["limit_gib"] is not None else f"n/a (host RAM {rep['host_memory_gib']} GiB, shared)")
        lines.append(f"  device {d['id']}: {d['kind']} [{d['platform']}]  memory {mem}")
    c = rep["cudnn_attention"]
    state = {True: "yes", False: "NO", None: "n/a"}[c["available"]]
    lines.append(f"cuDNN attention: {state} — {c['detail']}")
    if rep.get("cudnn_version"):
        lines.append(f"cuDNN: {rep['cudnn_version']}")
    lines.append(f"multi-process launcher: {rep['launcher'] or 'none (single process)'}"
                 + ("  (jax.distributed initialised)" if rep["distributed_initialised"] else ""))
    if rep["env"]:
        lines.append("env: " + "  ".join(f"{k}={v}" for k, v in rep["env"].items()))
    if rep["backend"] == "cpu":
        lines.append("note: JAX runs on the CPU; for a GPU install alignshift[cuda12] (or [cuda13]), for a TPU "
                     "alignshift[tpu] (README: On a GPU or TPU host)")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m alignshift.doctor", description=__doc__.split("\n\n")[0])
    ap.add_argument("--distributed", action="store_true",
                    help="call maybe_initialize_distributed() first (as the experiment scripts do)")
    ap.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    ap.add_argument("--require", choices=("cpu", "gpu", "tpu"), help="exit 1 unless JAX picked this backend")
    args = ap.parse_args(argv)
    rep = report(distributed=args.distributed)
    print(format_report(rep), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep, f, indent=1)
    if args.require and rep["backend"] != args.require:
        print(f"error: backend is {rep['backend']}, not {args.require}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
