"""Device mesh with axes ``("data", "fsdp", "tensor")`` and batch placement.

* ``data``   -- pure data parallelism: parameters replicated, batch split.
* ``fsdp``   -- data parallelism with parameters (and optimizer state) sharded along their
  ``embed`` dimension (ZeRO-3 style); the batch is split over ``data`` and ``fsdp`` together.
* ``tensor`` -- tensor (model) parallelism: ``vocab`` / ``heads`` / ``mlp`` dimensions split.

The mesh uses ``AxisType.Auto`` axes (``jax.sharding.Mesh(devices, names)``), i.e. the
classic GSPMD mode: arrays carry ``NamedSharding``s, ``jax.jit`` takes ``in_shardings`` /
``out_shardings`` and the compiler inserts the collectives. (``jax.make_mesh`` would default
to ``Explicit`` axes, which changes typing rules for every op; we don't use it.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "MESH_AXES",
    "BATCH_AXES",
    "make_mesh",
    "resolve_mesh_shape",
    "batch_sharding",
    "batch_shardings",
    "replicated",
    "shard_batch",
]

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")
BATCH_AXES: tuple[str, str] = ("data", "fsdp")  # the batch axis is split over both


def resolve_mesh_shape(n_devices: int, data: int = -1, fsdp: int = 1, tensor: int = 1) -> tuple[int, int, int]:
    """``(data, fsdp, tensor)`` with at most one ``-1`` ("the rest") filled in.

    Raises ``ValueError`` naming the requested shape and the device count when the shape
    does not multiply out to exactly ``n_devices``.
    """
    shape = [data, fsdp, tensor]
    req = f"(data={data}, fsdp={fsdp}, tensor={tensor})"
    if any(s == 0 or s < -1 for s in shape):
        raise ValueError(f"mesh shape {req}: sizes must be positive or -1 (the rest)")
    n_rest = shape.count(-1)
    if n_rest > 1:
        raise ValueError(f"mesh shape {req}: at most one axis may be -1 (the rest)")
    fixed = math.prod(s for s in shape if s != -1)
    if n_rest == 1:
        if n_devices % fixed:
            raise ValueError(
                f"mesh shape {req} does not divide the device count {n_devices}: "
                f"the fixed axes need a multiple of {fixed} devices"
            )
        shape[shape.index(-1)] = n_devices // fixed
    elif fixed != n_devices:
        raise ValueError(
            f"mesh shape {req} = {fixed} devices does not match the device count {n_devices}; "
            f"use -1 for one axis to take the rest"
        )
    return tuple(shape)  # type: ignore[return-value]


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ``Mesh`` of shape ``(data, fsdp, tensor)`` over ``devices`` (default ``jax.devices()``).

    ``-1`` on one axis means "the remaining devices"; the default is pure data parallelism
    over all devices. Devices are laid out with ``tensor`` fastest-varying (so the tensor
    axis, which communicates most, stays within a host / NVLink domain), using
    ``mesh_utils.create_device_mesh`` where it applies.
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(len(devices), data, fsdp, tensor)
    try:
        from jax.experimental import mesh_utils

        arr = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # unusual topologies / device subsets: plain row-major order
        arr = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(arr, MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated over ``mesh``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``("data", "fsdp")``, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def _n_batch_shards(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_shardings(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, NamedSharding]:
    """Per-key batch sharding; checks that every leading dimension divides ``data*fsdp``.

    Raises ``ValueError`` naming the key, its batch size and the mesh's data-parallel size.
    ``batch`` holds arrays or ``jax.ShapeDtypeStruct``s (global shapes).
    """
    n = _n_batch_shards(mesh)
    out = {}
    for k, v in batch.items():
        shape = np.shape(v) if not hasattr(v, "shape") else tuple(v.shape)
        if len(shape) == 0:
            out[k] = replicated(mesh)
            continue
        if shape[0] % n:
            raise ValueError(
                f"batch[{k!r}] has global batch size {shape[0]}, which is not divisible by the "
                f"mesh's data*fsdp = {mesh.shape['data']}*{mesh.shape['fsdp']} = {n}"
            )
        out[k] = batch_sharding(mesh)
    return out


def shard_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """Place a dict of global batch arrays on ``mesh``, split along the batch axis.

    Single process: ``batch`` holds the global arrays. Multi-process
    (``jax.process_count() > 1``): each process passes its own local rows (the global batch
    is the concatenation over processes in process order) and the global array is built with
    ``jax.make_array_from_process_local_data``. Scalars are replicated.
    """
    nproc = jax.process_count()
    if nproc == 1:
        shardings = batch_shardings(batch, mesh)
        return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}
    global_like = {
        k: jax.ShapeDtypeStruct((np.shape(v)[0] * nproc, *np.shape(v)[1:]) if np.ndim(v) else (), np.asarray(v).dtype)
        for k, v in batch.items()
    }
    shardings = batch_shardings(global_like, mesh)
    return {
        k: jax.make_array_from_process_local_data(shardings[k], np.asarray(v), global_like[k].shape)
        for k, v in batch.items()
    }
