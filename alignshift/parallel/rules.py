"""One rule table: parameter path -> logical axis names -> mesh axes -> ``NamedSharding``.

Two tables, applied in order:

1. :data:`PARAM_RULES` -- ``(regex, logical_axes)`` pairs, searched (first match wins) on the
   ``'/'``-joined parameter path, e.g. ``model/layers/3/self_attn/q_proj/kernel``. The names
   cover the Hugging Face-named modules of Llama / Gemma (``embed_tokens``, ``{q,k,v,o}_proj``,
   ``{gate,up,down}_proj``, ``lm_head``), GPT-NeoX (``embed_in``, ``query_key_value``,
   ``attention/dense``, ``dense_h_to_4h``, ``dense_4h_to_h``, ``embed_out``) and GPT-2
   (``wte``, ``wpe``, ``c_attn``, ``attn/c_proj``, ``c_fc``, ``mlp/c_proj``). Linear kernels are
   ``[in, out]`` (``nnx.Linear``), embeddings ``[vocab, embed]``; LoRA adapters ``lora_a``
   ``[in, r]`` / ``lora_b`` ``[r, out]`` are split like their base kernel's in / out dimension
   (rank replicated). Norm scales, biases of
   ``embed``-sized outputs and anything unmatched are replicated.
2. :data:`LOGICAL_TO_MESH` -- logical axis -> mesh axis: ``vocab``/``heads``/``mlp`` ->
   ``tensor`` (Megatron-style column/row split), ``embed`` -> ``fsdp`` (ZeRO-3 style sharding
   of every matrix along its model dimension); every other logical name is replicated.

Fallbacks (never crash on an odd shape):

* A dimension whose size is not divisible by its mesh axis's size is **replicated along that
  dimension** (e.g. a vocabulary of 257 on ``tensor=2`` keeps the vocab dim whole; the other
  dim is still sharded). The same happens when a mesh axis would be used twice in one spec.
* A parameter with more dimensions than its rule (e.g. layers stacked for ``nnx.scan``) gets
  leading replicated dimensions; one with fewer is fully replicated.

Optimizer state follows its parameter: :func:`state_shardings` gives every optimizer leaf
whose path ends with a parameter's path and whose shape equals that parameter's shape
(Adam's ``mu``/``nu``, momentum, ...) the parameter's sharding; everything else (step counts,
schedule state, factored statistics of another shape) is replicated.

Since ``jax.jit`` with ``NamedSharding`` in GSPMD (Auto) mode is semantically transparent,
any sharding gives the same results as one device up to float summation order; the table
only decides memory and communication.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from alignshift.parallel.mesh import batch_shardings, replicated

__all__ = [
    "PARAM_RULES",
    "LOGICAL_TO_MESH",
    "param_path",
    "logical_axes_for",
    "param_logical_axes",
    "unmatched_params",
    "logical_to_spec",
    "param_partition_specs",
    "param_shardings",
    "shard_params",
    "state_shardings",
    "place_state",
    "abstract_state",
    "make_sharded_step",
]

Axes = tuple  # tuple[str | None, ...]

_PROJ_LEAF = r"/(kernel|weight)$"
_QKV = r"(q_proj|k_proj|v_proj|qkv_proj|query_key_value|c_attn)"
_ATTN_OUT = r"(o_proj|(attention|attn|self_attn)/(dense|c_proj|out_proj))"
_MLP_IN = r"(gate_proj|up_proj|gate_up_proj|dense_h_to_4h|c_fc|fc1)"
_MLP_OUT = r"(down_proj|dense_4h_to_h|fc2|mlp/c_proj)"
_NORM = r"[^/]*(norm|ln_[^/]*|layernorm|layer_norm)[^/]*"

#: ``(regex on the '/'-joined path, logical axes)``; first match wins. ``None`` = replicated.
PARAM_RULES: tuple[tuple[str, Axes], ...] = (
    # LoRA adapters (alignshift.models.lora: lora_a [in, r], lora_b [r, out]) follow their base
    # layer: A is split like the base kernel's input dim, B like its output dim; rank replicated.
    (rf"(^|/)({_QKV}|{_MLP_IN})/lora_a$", ("embed", None)),
    (rf"(^|/)({_QKV})/lora_b$", (None, "heads")),
    (rf"(^|/)({_MLP_IN})/lora_b$", (None, "mlp")),
    (rf"(^|/){_ATTN_OUT}/lora_a$", ("heads", None)),
    (rf"(^|/){_MLP_OUT}/lora_a$", ("mlp", None)),
    (rf"(^|/)({_ATTN_OUT}|{_MLP_OUT})/lora_b$", (None, "embed")),
    # norms first: "input_layernorm/weight" must not be mistaken for a projection
    (rf"(^|/){_NORM}/(weight|scale|bias)$", (None,)),
    # embeddings [vocab, embed] and position embeddings [positions, embed]
    (r"(^|/)(embed_tokens|embed_in|wte|word_embeddings)/(embedding|weight)$", ("vocab", "embed")),
    (r"(^|/)(wpe|embed_positions|position_embeddings)/(embedding|weight)$", (None, "embed")),
    # unembedding [embed, vocab]
    (r"(^|/)(lm_head|embed_out)" + _PROJ_LEAF, ("embed", "vocab")),
    (r"(^|/)(lm_head|embed_out)/bias$", ("vocab",)),
    # attention: column-parallel in, row-parallel out
    (rf"(^|/){_QKV}" + _PROJ_LEAF, ("embed", "heads")),
    (rf"(^|/){_QKV}/bias$", ("heads",)),
    (rf"(^|/){_ATTN_OUT}" + _PROJ_LEAF, ("heads", "embed")),
    # MLP: column-parallel in, row-parallel out
    (rf"(^|/){_MLP_IN}" + _PROJ_LEAF, ("embed", "mlp")),
    (rf"(^|/){_MLP_IN}/bias$", ("mlp",)),
    (rf"(^|/){_MLP_OUT}" + _PROJ_LEAF, ("mlp", "embed")),
    # remaining biases (outputs of size embed) and scalars: replicated
    (r"(^|/)bias$", (None,)),
)

#: logical axis -> mesh axis (or tuple of mesh axes); names not listed are replicated.
LOGICAL_TO_MESH: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "heads": "tensor",
    "mlp": "tensor",
    "embed": "fsdp",
    "batch": ("data", "fsdp"),
}

_COMPILED: dict[tuple, list] = {}


def _compiled(rules: Sequence[tuple[str, Axes]]) -> list:
    key = tuple((r, tuple(a)) for r, a in rules)
    if key not in _COMPILED:
        _COMPILED[key] = [(re.compile(r), tuple(a)) for r, a in rules]
    return _COMPILED[key]


# --------------------------------------------------------------------------- paths


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def param_path(keypath: Sequence[Any]) -> str:
    """``'/'``-joined path of a pytree key path, without nnx's trailing ``.value``."""
    names = [_key_name(k) for k in keypath]
    if names and names[-1] == "value" and isinstance(keypath[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return "/".join(names)


def _leaves_with_paths(tree: Any) -> list[tuple[str, Any]]:
    return [(param_path(kp), x) for kp, x in jax.tree_util.tree_leaves_with_path(tree)]


# --------------------------------------------------------------------------- logical axes


def logical_axes_for(path: str, ndim: int, rules: Sequence[tuple[str, Axes]] = PARAM_RULES) -> Axes:
    """Logical axis names (one per dimension; ``None`` = replicated) of the parameter ``path``."""
    for pattern, axes in _compiled(rules):
        if pattern.search(path):
            if len(axes) == ndim:
                return axes
            if len(axes) < ndim:  # stacked / scanned layers: leading dims replicated
                return (None,) * (ndim - len(axes)) + axes
            return (None,) * ndim
    return (None,) * ndim


def param_logical_axes(params: Any, rules: Sequence[tuple[str, Axes]] = PARAM_RULES) -> dict[str, Axes]:
    """``{path: logical axes}`` for every parameter leaf (for inspection and docs)."""
    return {p: logical_axes_for(p, np.ndim(x) if not hasattr(x, "ndim") else x.ndim, rules)
            for p, x in _leaves_with_paths(params)}


def unmatched_params(params: Any, rules: Sequence[tuple[str, Axes]] = PARAM_RULES) -> list[str]:
    """Paths of parameters no rule matches (they are replicated); empty for the supported
    architectures. Check this when adding a model."""
    compiled = _compiled(rules)
    return [p for p, _ in _leaves_with_paths(params) if not any(r.search(p) for r, _ in compiled)]


def logical_to_spec(
    axes: Axes,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
    logical_to_mesh: Mapping[str, Any] = LOGICAL_TO_MESH,
) -> P:
    """``PartitionSpec`` for logical ``axes``. With ``shape`` and ``mesh``, a dimension not
    divisible by its mesh axis size (or reusing a mesh axis already taken) is replicated."""
    used: set[str] = set()
    out = []
    for i, name in enumerate(axes):
        target = logical_to_mesh.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        names = (target,) if isinstance(target, str) else tuple(target)
        if mesh is not None:
            names = tuple(n for n in names if n in mesh.shape)
        if not names or used.intersection(names):
            out.append(None)
            continue
        if shape is not None and mesh is not None:
            size = int(np.prod([mesh.shape[n] for n in names]))
            if shape[i] % size:
                out.append(None)
                continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _spec_for(path: str, x: Any, mesh: Mesh | None, rules, logical_to_mesh) -> P:
    shape = tuple(np.shape(x)) if not hasattr(x, "shape") else tuple(x.shape)
    return logical_to_spec(logical_axes_for(path, len(shape), rules), shape, mesh, logical_to_mesh)


def _map_with_path(fn: Callable[[str, Any], Any], tree: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda kp, x: fn(param_path(kp), x), tree)


def param_partition_specs(
    params: Any,
    mesh: Mesh | None = None,
    *,
    rules: Sequence[tuple[str, Axes]] = PARAM_RULES,
    logical_to_mesh: Mapping[str, Any] = LOGICAL_TO_MESH,
) -> Any:
    """Same-tree ``PartitionSpec``s for a parameter tree (``nnx.State``, dict, arrays or
    ``ShapeDtypeStruct``s). Without ``mesh`` no divisibility fallback is applied."""
    return _map_with_path(lambda p, x: _spec_for(p, x, mesh, rules, logical_to_mesh), params)


def param_shardings(params: Any, mesh: Mesh, **kw) -> Any:
    """Same-tree ``NamedSharding``s for a parameter tree on ``mesh``."""
    specs = param_partition_specs(params, mesh, **kw)
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def shard_params(params: Any, mesh: Mesh, **kw) -> Any:
    """``params`` placed on ``mesh`` by the rule table."""
    return jax.device_put(params, param_shardings(params, mesh, **kw))


# --------------------------------------------------------------------------- train state


def state_shardings(state: Any, mesh: Mesh, *, params_key: str = "params", **kw) -> Any:
    """Same-tree ``NamedSharding``s for a train state ``{"step", "params", "opt_state", ...}``.

    Parameters follow the rule table; an optimizer-state leaf takes the sharding of the
    parameter whose path its own path ends with, provided the shapes are equal (so Adam's
    ``mu``/``nu`` are sharded exactly like the weights and the update stays local);
    everything else is replicated. A tree without ``params_key`` is treated as a parameter
    tree itself.
    """
    if not (isinstance(state, Mapping) and params_key in state):
        return param_shardings(state, mesh, **kw)
    params = state[params_key]
    pshard = param_shardings(params, mesh, **kw)
    by_path: dict[tuple[str, ...], tuple[tuple[int, ...], NamedSharding]] = {}
    for (p, x), s in zip(_leaves_with_paths(params), jax.tree_util.tree_leaves(pshard)):
        by_path[tuple(p.split("/"))] = (tuple(np.shape(x) if not hasattr(x, "shape") else x.shape), s)
    rep = replicated(mesh)

    def follow(path: str, x: Any) -> NamedSharding:
        parts = tuple(path.split("/"))
        shape = tuple(np.shape(x) if not hasattr(x, "shape") else x.shape)
        for k in range(len(parts)):
            hit = by_path.get(parts[k:])
            if hit is not None and hit[0] == shape:
                return hit[1]
        return rep

    out = {}
    for k, v in state.items():
        out[k] = pshard if k == params_key else _map_with_path(follow, v)
    return type(state)(out) if not isinstance(state, dict) else out


def place_state(state: Any, mesh: Mesh, **kw) -> Any:
    """``state`` placed on ``mesh`` (parameters by the rule table, optimizer state following them)."""
    return jax.device_put(state, state_shardings(state, mesh, **kw))


def abstract_state(state: Any, mesh: Mesh, **kw) -> Any:
    """``ShapeDtypeStruct`` tree with ``mesh`` shardings: the ``state_like`` to restore a
    checkpoint (saved from any mesh) directly onto ``mesh`` without materialising it first::

        state, meta = Checkpointer(dir).restore(abstract_state(state_template, new_mesh))
    """
    shardings = state_shardings(state, mesh, **kw)
    return jax.tree_util.tree_map(
        lambda x, s: jax.ShapeDtypeStruct(np.shape(x) if not hasattr(x, "shape") else x.shape, x.dtype, sharding=s),
        state,
        shardings,
    )


# --------------------------------------------------------------------------- jitted step


def _is_flat_batch(x: Any) -> bool:
    return (
        isinstance(x, dict)  # nnx.State and nested param dicts are not flat
        and len(x) > 0
        and all(isinstance(k, str) and hasattr(v, "shape") and len(v.shape) > 0 for k, v in x.items())
    )


def _extra_sharding(x: Any, mesh: Mesh, **kw) -> Any:
    if x is None:
        return None
    if _is_flat_batch(x):
        return batch_shardings(x, mesh)
    return param_shardings(x, mesh, **kw)


def make_sharded_step(
    step_fn: Callable,
    state: Any,
    batch_example: Mapping[str, Any],
    mesh: Mesh,
    *extra_args: Any,
    donate_state: bool = True,
    extra_shardings: Sequence[Any] | None = None,
    **kw,
) -> Callable:
    """``jax.jit`` a ``step(state, batch, *extra) -> (state, metrics)`` with mesh shardings.

    ``state`` / ``batch_example`` / ``extra_args`` fix the shardings (arrays or
    ``ShapeDtypeStruct``s; the batch only needs the right keys and global shapes). Each extra
    argument is ``None``, a flat dict of arrays (another batch, e.g. ``val_batch``: split over
    ``("data", "fsdp")`` like the batch) or a parameter tree (e.g. the frozen reference params
    for an in-step reference forward: sharded by the rule table); ``extra_shardings`` (one
    entry per extra argument) overrides that guess. The state is sharded by
    :func:`state_shardings` on input and output; metrics come back replicated. The batch
    splits over ``("data", "fsdp")``; its global size must divide ``data*fsdp`` (checked here).

    ``step_fn`` may be already jitted (e.g. :func:`alignshift.train.steps.make_preference_step`):
    its underlying Python function is re-jitted, so there is one compilation with these
    shardings. Host (numpy) batches are placed by jit; put the state (:func:`place_state`) and
    extra params (:func:`shard_params`) on the mesh first::

        mesh = make_mesh(data=2, fsdp=2, tensor=2)
        step = make_preference_step(graphdef, rest, tx, objective)
        state = place_state(init_state(params, tx), mesh)
        ref = shard_params(ref_params, mesh)
        sstep = make_sharded_step(step, state, batch, mesh, ref)
        state, metrics = sstep(state, batch, ref)

    Equivalent by hand: ``jax.jit(step, in_shardings=(state_shardings(state, mesh),
    batch_shardings(batch, mesh), param_shardings(ref, mesh)), out_shardings=(
    state_shardings(state, mesh), replicated(mesh)), donate_argnums=0)``.
    """
    fn = step_fn
    if hasattr(step_fn, "lower") and hasattr(step_fn, "__wrapped__"):  # a jax.jit-wrapped function
        fn = step_fn.__wrapped__
    s_sh = state_shardings(state, mesh, **kw)
    b_sh = batch_shardings(batch_example, mesh)
    if extra_shardings is not None:
        if len(extra_shardings) != len(extra_args):
            raise ValueError(f"{len(extra_shardings)} extra_shardings for {len(extra_args)} extra arguments")
        e_sh = tuple(extra_shardings)
    else:
        e_sh = tuple(_extra_sharding(e, mesh, **kw) for e in extra_args)
    return jax.jit(
        fn,
        in_shardings=(s_sh, b_sh, *e_sh),
        out_shardings=(s_sh, replicated(mesh)),
        donate_argnums=(0,) if donate_state else (),
    )
