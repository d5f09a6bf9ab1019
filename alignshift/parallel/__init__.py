"""Sharded training on a ``("data", "fsdp", "tensor")`` device mesh (jit + ``NamedSharding``).

Typical use (single- or multi-host; see :func:`maybe_initialize_distributed`)::

    from alignshift.parallel import make_mesh, make_sharded_step, place_state, shard_params

    maybe_initialize_distributed()                 # no-op on one process
    mesh = make_mesh(data=-1, fsdp=2, tensor=2)    # -1: the rest of the devices
    state = place_state(init_state(params, tx), mesh)
    ref = shard_params(ref_params, mesh)           # only for an in-step reference
    step = make_sharded_step(make_preference_step(graphdef, rest, tx, obj), state, batch, mesh, ref)
    state, metrics = step(state, batch, ref)       # numpy batches are split over data*fsdp

Data-parallel ``jax.pmap`` alternative (state replicated, batch split, gradients pmean'd;
batch reductions such as KLDPO's mean, KTO's z0, DR-DPO and KMM use collectives so the
result equals the global-batch step)::

    from alignshift.train.pmap import make_pmap_preference_step, replicate, shard_for_pmap
    step = make_pmap_preference_step(graphdef, rest, tx, objective)
    state, metrics = step(replicate(init_state(params, tx)), shard_for_pmap(batch))

Checkpoints saved from one mesh restore onto another with
``Checkpointer.restore(abstract_state(state, new_mesh))``.
"""

from alignshift.parallel.distributed import maybe_initialize_distributed, multi_process_env
from alignshift.parallel.mesh import (
    BATCH_AXES,
    MESH_AXES,
    batch_sharding,
    batch_shardings,
    make_mesh,
    replicated,
    resolve_mesh_shape,
    shard_batch,
)
from alignshift.parallel.rules import (
    LOGICAL_TO_MESH,
    PARAM_RULES,
    abstract_state,
    logical_axes_for,
    logical_to_spec,
    make_sharded_step,
    param_logical_axes,
    param_partition_specs,
    param_path,
    param_shardings,
    place_state,
    shard_params,
    state_shardings,
    unmatched_params,
)

__all__ = [
    "BATCH_AXES",
    "LOGICAL_TO_MESH",
    "MESH_AXES",
    "PARAM_RULES",
    "abstract_state",
    "batch_sharding",
    "batch_shardings",
    "logical_axes_for",
    "logical_to_spec",
    "make_mesh",
    "make_sharded_step",
    "maybe_initialize_distributed",
    "multi_process_env",
    "param_logical_axes",
    "param_partition_specs",
    "param_path",
    "param_shardings",
    "place_state",
    "replicated",
    "resolve_mesh_shape",
    "shard_batch",
    "shard_params",
    "state_shardings",
    "unmatched_params",
]
