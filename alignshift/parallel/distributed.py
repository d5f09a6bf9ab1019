"""Multi-process (multi-host) start-up."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax

__all__ = ["multi_process_env", "maybe_initialize_distributed"]

log = logging.getLogger(__name__)

_initialized = False


def _int(env: Mapping[str, str], name: str) -> int | None:
    try:
        return int(env[name])
    except (KeyError, ValueError):
        return None


def multi_process_env(env: Mapping[str, str] | None = None) -> str | None:
    """Which launcher says this is a multi-process run (``None`` for a single process).

    * ``"jax"``: any of ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` (> 1) or
      ``JAX_PROCESS_ID`` is set (explicit set-up; the three are passed to
      ``jax.distributed.initialize``).
    * ``"slurm"``: ``SLURM_JOB_ID`` with ``SLURM_NTASKS`` (or ``SLURM_NPROCS``) > 1.
    * ``"ompi"``: Open MPI's ``OMPI_COMM_WORLD_SIZE`` > 1.
    * ``"tpu"``: a multi-host TPU slice (``TPU_WORKER_HOSTNAMES`` listing more than one host,
      or ``MEGASCALE_COORDINATOR_ADDRESS`` set).
    * ``"auto"``: ``ALIGNSHIFT_DISTRIBUTED=1`` forces a multi-process start with JAX's own
      cluster auto-detection, for launchers whose set-up is not in the environment (a Cloud TPU
      VM pod, whose worker list lives in the VM metadata). ``ALIGNSHIFT_DISTRIBUTED=0`` forces a
      single process whatever the environment says.
    """
    env = os.environ if env is None else env
    forced = env.get("ALIGNSHIFT_DISTRIBUTED", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return None
    if forced and forced not in ("1", "true", "yes", "on"):
        raise ValueError(f"ALIGNSHIFT_DISTRIBUTED must be 1 or 0 (or true/false); got {forced!r}")
    if env.get("JAX_COORDINATOR_ADDRESS") or env.get("JAX_PROCESS_ID") or (_int(env, "JAX_NUM_PROCESSES") or 1) > 1:
        return "jax"
    if env.get("SLURM_JOB_ID") and ((_int(env, "SLURM_NTASKS") or _int(env, "SLURM_NPROCS") or 1) > 1):
        return "slurm"
    if (_int(env, "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "ompi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1 or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return "tpu"
    return "auto" if forced else None


def maybe_initialize_distributed(env: Mapping[str, str] | None = None, **kwargs) -> bool:
    """Call ``jax.distributed.initialize()`` iff the environment describes a multi-process run.

    Returns ``True`` when JAX's distributed runtime is (now or already) initialised, ``False``
    for a single-process run, where nothing is done. Idempotent: a second call is a no-op.

    Detection (see :func:`multi_process_env`): explicit ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` (read here and passed on, ``kwargs`` win), or a
    SLURM job with several tasks, Open MPI with several ranks, or a multi-host TPU slice --
    for those JAX's own cluster auto-detection fills in coordinator, process count and id.

    Must run before anything touches a JAX backend (``jax.devices()``, creating an array):
    ``jax.distributed.initialize`` refuses afterwards. After it, ``jax.devices()`` lists the
    devices of all processes and :func:`alignshift.parallel.make_mesh` spans them; each
    process feeds its own rows through :func:`alignshift.parallel.shard_batch`.
    """
    global _initialized
    is_init = getattr(jax.distributed, "is_initialized", None)
    if _initialized or (is_init is not None and is_init()):
        _initialized = True
        return True
    env = os.environ if env is None else env
    kind = multi_process_env(env)
    if kind is None:
        return False
    args: dict = {}
    if kind == "jax":
        if env.get("JAX_COORDINATOR_ADDRESS"):
            args["coordinator_address"] = env["JAX_COORDINATOR_ADDRESS"]
        if _int(env, "JAX_NUM_PROCESSES") is not None:
            args["num_processes"] = _int(env, "JAX_NUM_PROCESSES")
        if _int(env, "JAX_PROCESS_ID") is not None:
            args["process_id"] = _int(env, "JAX_PROCESS_ID")
    args.update(kwargs)
    log.info("initialising jax.distributed (%s launcher): %s", kind, args)
    jax.distributed.initialize(**args)
    _initialized = True
    return True
