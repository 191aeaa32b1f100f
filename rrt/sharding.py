"""The device mesh and the ONE table of logical-axis rules.

Mesh axes: `data` (pure data parallel: replicas), `fsdp` (data parallel with parameters and optimizer state sharded),
`tensor` (Megatron-style model parallel on heads and MLP width). Every parameter names its logical axes in
`rrt.model.param_axes`; `RULES` maps each logical axis to mesh axes. A dimension that the mapped mesh axes do not
divide is replicated instead (tiny test models), never padded.

Shared-block gathering. Every loop re-uses the same K shared layers. Sharded by FSDP and closed over by the scan,
they would be all-gathered inside the loop body, once per depth position (L = K * R gathers of a layer per step).
`gather_shared=True` constrains the shared block to be replicated over `fsdp` before the scan, so XLA gathers it
once per step and every loop (and the backward pass) reuses it; it costs the memory of one unsharded shared block,
which is small for recursive models (1 / R of the original layers). Its gradient is still all-reduced once per
depth position inside the backward loop (XLA keeps the loop's gradient accumulator reduced); docs/TRAINING.md has
the counts.

Activations. The embedding table is sharded over `fsdp` on D, so left alone XLA gathers the token ids instead of
the table, shards the activations on D, and runs the whole stack model-parallel over `fsdp`: it all-gathers
activations at every depth position and never gathers a weight (gather_shared then has nothing to save). The
training loss constrains the loops' hidden states [R, B, T, D] to batch-sharded rows (`activation_constraint`); that
fixes the scan's carry, so weights are gathered and activations stay local, as FSDP intends.
"""

import math

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from rrt import model as model_lib

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axes (None: replicated). The one table.
RULES: dict[str, tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv": ("tensor",),
    "mlp": ("tensor",),
    "rank": None,
    "layers": None,
    "positions": None,
    "norm": None,
    "time": None,
}


def make_mesh(shape: tuple[int, int, int] | list[int], devices=None) -> Mesh:
    """A (data, fsdp, tensor) mesh. One entry may be -1: it takes the remaining devices."""
    devices = np.asarray(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {shape}")
    if -1 in shape:
        known = math.prod(s for s in shape if s != -1)
        shape[shape.index(-1)] = devices.size // known
    if math.prod(shape) != devices.size:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices; {devices.size} available"
        )
    return Mesh(devices.reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def spec(
    logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, drop: tuple[str, ...] = ()
) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes; `drop` removes mesh axes (e.g. gather over fsdp)."""
    out = []
    for axis, dim in zip(logical, shape):
        mesh_axes = tuple(a for a in (RULES.get(axis) or ()) if a not in drop and mesh.shape[a] > 1) if axis else ()
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        out.append(mesh_axes if mesh_axes and dim % size == 0 else None)
    return PartitionSpec(*out)


def param_shardings(params: dict, mesh: Mesh, drop: tuple[str, ...] = ()) -> dict:
    """NamedShardings for a nested parameter dict (leaves may be arrays or ShapeDtypeStructs)."""

    def one(path, leaf):
        name = "/".join(k.key for k in path)
        return NamedSharding(mesh, spec(model_lib.param_axes(name), leaf.shape, mesh, drop))

    return jax.tree_util.tree_map_with_path(one, params)


def activation_constraint(mesh: Mesh, logical: tuple[str | None, ...]):
    """A function constraining an activation with these logical axes to the table's sharding (see the module doc)."""

    def constrain(x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical, x.shape, mesh)))

    return constrain


def opt_state_shardings(opt: optax.GradientTransformation, abstract_opt_state, param_sh: dict, mesh: Mesh):
    """Every copy of the parameter tree inside an optimizer state (Adam moments) takes the parameters' shardings;
    the rest (step counts) is replicated. Explicit because compiling `opt.init` does not propagate them: it never
    reads the parameters' values, JAX prunes them, and the whole state would land on one device."""
    replicated = NamedSharding(mesh, PartitionSpec())
    masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731  (multi_transform: another group's leaf)
    return optax.tree_map_params(
        opt,
        lambda leaf, sh: leaf if masked(leaf) else sh,
        abstract_opt_state,
        param_sh,
        transform_non_params=lambda _: replicated,
        is_leaf=masked,
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[B, T] batches: rows over (data, fsdp)."""
    return NamedSharding(mesh, PartitionSpec(RULES["batch"], None))


def shared_gather_constraint(mesh: Mesh):
    """A function constraining the shared block ({name: [K, ...]}) to be replicated over fsdp (see module doc)."""

    def constrain(shared: dict) -> dict:
        out = {}
        for name, w in shared.items():
            s = spec(model_lib.param_axes("layers/" + name), w.shape, mesh, drop=("fsdp",))
            out[name] = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, s))
        return out

    return constrain
